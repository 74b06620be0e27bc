"""The "auto" backend: per layer, the faster of "native" and "torch", chosen by a short timing.

The first call of a layer with a given input shape (and mask version) times forward + backward of both
candidates on copies of the input (the layer's own gradients are not touched), keeps the faster, and
records the timings in `AutoBackend.choices[layer]` and on the layer as `layer.auto_choice`. Later calls
with that shape go straight to the chosen backend. If the native kernels cannot be built here, every
layer runs on "torch" and the record says why.
"""
import time
import weakref

import torch

from siftc.errors import SiftcError


def _time(fn, reps: int) -> float:
    fn()  # warm-up: builds indexes, touches memory
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


class AutoBackend:
    name = "auto"

    def __init__(self, candidates: dict, reps: int = 3):
        self.candidates = candidates  # name -> backend object, the ones it times and chooses between
        self.reps = reps  # medians of 3 after a warm-up: enough to separate 1.3x, cheap once per layer
        self.choices = weakref.WeakKeyDictionary()  # layer -> {(shape, version): record}

    def _choose(self, layer, x, op: str) -> str:
        key = (tuple(x.shape), x.dtype, layer.mask_version)
        records = self.choices.setdefault(layer, {})
        if key in records:
            return records[key]["choice"]
        record = {"ms": {}}
        weight = layer.weight.detach().clone().requires_grad_()  # timing leaves layer.weight.grad alone
        for name, backend in self.candidates.items():
            xin = x.detach().clone().requires_grad_(x.requires_grad)

            def step():
                with torch.enable_grad():
                    saved = layer.weight
                    try:
                        layer._parameters["weight"] = weight
                        y = getattr(backend, op)(layer, xin)
                        grads = torch.autograd.grad(y.sum(), [weight] + ([xin] if xin.requires_grad else []))
                    finally:
                        layer._parameters["weight"] = saved
                    return grads
            try:
                record["ms"][name] = 1e3 * _time(step, self.reps)
            except SiftcError as e:  # e.g. no compiler: that candidate is out
                record.setdefault("errors", {})[name] = str(e)
        record["choice"] = min(record["ms"], key=record["ms"].get)
        records[key] = record
        layer.auto_choice = record
        return record["choice"]

    def linear(self, layer, x):
        return self.candidates[self._choose(layer, x, "linear")].linear(layer, x)

    def conv2d(self, layer, x):
        return self.candidates[self._choose(layer, x, "conv2d")].conv2d(layer, x)

    def conv1d(self, layer, x):
        return self.candidates[self._choose(layer, x, "conv1d")].conv1d(layer, x)
