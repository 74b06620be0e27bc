"""Sparse training: mask distributions, the Static / SET / RigL mask schedulers, and sparsity patterns.

    sched = siftc.sparse.RigL(model, optimizer, total_steps=10_000)   # then sched.step() after each
                                                                      # optimizer.step()
    siftc.sparse.impose_pattern(layer, siftc.sparse.Pattern.parse("block:4x1"))  # a structured layer
"""
from siftc.sparse.distribution import (DISTRIBUTIONS, apply, distribute, erk, impose_pattern, reposition,
                                       sparse_layers, uniform)
from siftc.sparse.patterns import UNSTRUCTURED, Fitted, Pattern, check_structure, effective_sparsity, fit
from siftc.sparse.schedulers import METHODS, SET, RigL, Static, cosine_drop_fraction, dense_weight_grad

__all__ = ["DISTRIBUTIONS", "METHODS", "UNSTRUCTURED", "Fitted", "Pattern", "RigL", "SET", "Static", "apply",
           "check_structure", "cosine_drop_fraction", "dense_weight_grad", "distribute", "effective_sparsity",
           "erk", "fit", "impose_pattern", "reposition", "sparse_layers", "uniform"]
