"""The "auto" backend: per layer, the faster of "native" and "torch", chosen by a short timing.

The first call of a layer with a given input shape (and mask version) times forward + backward of both
candidates on copies of the input (the layer's own gradients are not touched), keeps the faster, and
records the timings in `AutoBackend.choices[layer]` and on the layer as `layer.auto_choice`. Later calls
with that shape go straight to the chosen backend. If the native kernels cannot be built here, every
layer runs on "torch" and the record says why. For a Linear with a structured pattern the block
kernels take, "native" is those kernels (siftc.runtime.native), so auto weighs them against masked dense.

The choices are part of a training checkpoint (`choices_of` / `restore`, plain data keyed by the layer's
qualified name and the input's shape and dtype): native and torch round differently, so a resumed run
that timed afresh could choose otherwise and drift from the run it continues. A restored choice holds
at the layer's mask as loaded; a later mask update (SET, RigL) is timed as usual.
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
        self.choices = weakref.WeakKeyDictionary()  # layer -> {(shape, dtype, mask_version): record}

    def _choose(self, layer, x, op: str) -> str:
        key = (tuple(x.shape), x.dtype, layer.mask_version)
        records = self.choices.setdefault(layer, {})
        if key in records:
            return records[key]["choice"]
        record = {"ms": {}}
        values = layer.values.detach().clone().requires_grad_()  # timing leaves layer.values.grad alone
        for name, backend in self.candidates.items():
            xin = x.detach().clone().requires_grad_(x.requires_grad)

            def step():
                with torch.enable_grad():
                    saved = layer.values
                    try:
                        layer._parameters["values"] = values
                        y = getattr(backend, op)(layer, xin)
                        grads = torch.autograd.grad(y.sum(), [values] + ([xin] if xin.requires_grad else []))
                    finally:
                        layer._parameters["values"] = saved
                    return grads
            try:
                record["ms"][name] = 1e3 * _time(step, self.reps)
            except SiftcError as e:  # e.g. no compiler: that candidate is out
                record.setdefault("errors", {})[name] = str(e)
        record["choice"] = min(record["ms"], key=record["ms"].get)
        records[key] = record
        layer.auto_choice = record
        return record["choice"]

    def choices_of(self, model) -> dict:
        """The choices in force at the current masks of `model`'s layers, as plain data for a checkpoint
        (no objects, so `torch.load(weights_only=True)` reads it):

            {"0.branches.1": [{"shape": [16, 64], "dtype": "float32", "choice": "native",
                               "ms": {"native": 0.04, "torch": 0.07}}]}

        Choices for earlier masks are left out: a layer never goes back to one."""
        out = {}
        for name, layer in model.named_modules():
            now = [{"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), **record}
                   for (shape, dtype, version), record in self.choices.get(layer, {}).items()
                   if version == layer.mask_version]
            if now:
                out[name] = now
        return out

    def restore(self, model, saved: dict):
        """Take back `choices_of(model)`'s data, for each layer at its mask as it is now (loading a state
        dict gives it a new mask_version), so none of them is timed again."""
        for name, records in saved.items():
            layer = model.get_submodule(name)
            mine = self.choices.setdefault(layer, {})
            for r in records:
                dtype = getattr(torch, r["dtype"], None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"{name}: {r['dtype']!r} is not a torch dtype")
                record = {k: v for k, v in r.items() if k not in ("shape", "dtype")}
                mine[(tuple(r["shape"]), dtype, layer.mask_version)] = record
                layer.auto_choice = record

    def linear(self, layer, x):
        return self.candidates[self._choose(layer, x, "linear")].linear(layer, x)

    def conv2d(self, layer, x):
        return self.candidates[self._choose(layer, x, "conv2d")].conv2d(layer, x)

    def conv1d(self, layer, x):
        return self.candidates[self._choose(layer, x, "conv1d")].conv1d(layer, x)
