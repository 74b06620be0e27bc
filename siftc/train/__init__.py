"""`siftc train`: sparse training of a converted model with a mask scheduler on a runtime backend.

    from siftc.train import TrainConfig, train
    summary = train(TrainConfig("out/mlp-par90", "data/digits.npz", "runs/mlp", method="rigl", steps=500))
"""
from siftc.train.config import OPTIMIZERS, TrainConfig
from siftc.train.flops import training_flops
from siftc.train.loop import evaluate, train

__all__ = ["OPTIMIZERS", "TrainConfig", "evaluate", "train", "training_flops"]
