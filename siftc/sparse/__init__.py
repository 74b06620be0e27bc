"""Sparse training: mask distributions and the Static / SET / RigL mask schedulers.

    sched = siftc.sparse.RigL(model, optimizer, total_steps=10_000)   # then sched.step() after each
                                                                      # optimizer.step()
"""
from siftc.sparse.distribution import DISTRIBUTIONS, apply, distribute, erk, sparse_layers, uniform
from siftc.sparse.schedulers import METHODS, SET, RigL, Static, cosine_drop_fraction, dense_weight_grad

__all__ = ["DISTRIBUTIONS", "METHODS", "RigL", "SET", "Static", "apply", "cosine_drop_fraction",
           "dense_weight_grad", "distribute", "erk", "sparse_layers", "uniform"]
