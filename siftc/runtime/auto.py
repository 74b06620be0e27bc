"""The "auto" backend: per layer, the faster of "native" and "torch", chosen by a short timing.

It is the default backend of every sparse layer (siftc.runtime.DEFAULT), from the CLI and from Python.
The first call of a layer in a given *setting* times the candidates on copies of the input (the layer's
own gradients are not touched), keeps the faster, and records the timings in `AutoBackend.choices[layer]`
and on the layer as `layer.auto_choice`. Later calls in that setting go straight to the chosen backend. A
setting is the input's shape with its batch rounded up to a power of two (so variable batch sizes and
sequence lengths time a layer a few times, not once per length), its dtype, whether gradients are wanted
("train": forward and backward are timed; "infer", under torch.no_grad or for an input and layer that need
none: the forward only), and the layer's mask version.

The timing is kept cheap: "torch" (the reference) is timed first; then, only when its call takes over a
millisecond (fast layers are timed in full):
  - "native" is not timed at all where a rough cost model says it would be over SKIP_PREDICTED times
    slower: its time goes as nnz x the batch padded to 16 (the kernels' vector tile) over its efficiency
    per FLOP against the dense GEMM (NATIVE_EFFICIENCY, measured by benchmarks/patterns.py: about 0.07
    unstructured, 0.3 in blocks), masked dense's as the dense weight x the batch; so a layer at 50%
    unstructured, or any layer at batch 1, stays on torch without paying for a slow warm-up;
  - a candidate whose warm-up call, or first timed call, is already several times slower than the best
    so far is dropped without its remaining repeats. If the
native kernels cannot be built here, every layer runs on "torch" and the record says why. For a layer
with a structured pattern the block kernels take, "native" is those kernels (siftc.runtime.native), so
auto weighs them against masked dense.

native and torch round differently (both within float32 tolerance of each other), so two processes that
time a layer differently give outputs that differ in their last bits; `siftc.set_backend(model, "torch")`
pins the reference for bit-reproducible outputs.

The choices are part of a training checkpoint (`choices_of` / `restore`, plain data keyed by the layer's
qualified name and the setting): a resumed run that timed afresh could choose otherwise and drift from the
run it continues. A restored choice holds at the layer's mask as loaded; a later mask update (SET, RigL)
is timed as usual.
"""
import math
import time
import weakref

import torch

from siftc.errors import SiftcError

DROP_AFTER_WARMUP = 4.0  # a warm-up (it builds the candidate's indexes) this many times the best: dropped
DROP_AFTER_FIRST = 2.0   # a first timed call this many times the best: dropped
DROP_ABOVE_MS = 1.0      # ...only when the best call takes longer than this (fast layers: timed in full)
NATIVE_EFFICIENCY = {False: 0.07, True: 0.3}  # native's useful GFLOP/s over the dense GEMM's: unstructured,
                                              # structured (benchmarks/results/patterns.json, AMD EPYC AVX2)
SKIP_PREDICTED = 4.0     # native predicted this many times slower than masked dense: not timed
BATCH_TILE = 16          # the native kernels pad the batch (a Linear's rows) to a multiple of this


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _rows(x: torch.Tensor, op: str) -> int:
    """What the kernels tile: a Linear's rows (all leading dims), a conv's batch."""
    return math.prod(x.shape[:-1]) if op == "linear" else x.shape[0]


def setting(x: torch.Tensor, op: str) -> tuple:
    """The shape a choice is keyed by: a Linear's rows (all leading dims), or a conv's batch, rounded up
    to a power of two; the other dims as they are."""
    rest = x.shape[-1:] if op == "linear" else x.shape[1:]
    return (_bucket(_rows(x, op)), *rest)


def predicted_native_over_torch(layer, x, op: str) -> float:
    """native's time over masked dense's for `layer` on `x`, by the cost model above (rough by design:
    it only rules out what is clearly slower)."""
    rows = _rows(x, op)
    padded = -(-max(rows, 1) // BATCH_TILE) * BATCH_TILE
    structured = layer.pattern is not None and layer.pattern.structured
    return layer.density * padded / max(rows, 1) / NATIVE_EFFICIENCY[structured]


def _timed(fn, reps: int, best_ms: float | None) -> tuple[float, bool]:
    """(median ms of `reps` calls after a warm-up, dropped early?)."""
    def call():
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    warm = call()  # warm-up: builds indexes, touches memory
    slow = best_ms is not None and best_ms > DROP_ABOVE_MS
    if slow and warm > DROP_AFTER_WARMUP * best_ms:
        return warm, True
    times = [call()]
    if slow and times[0] > DROP_AFTER_FIRST * best_ms:
        return times[0], True
    times += [call() for _ in range(reps - 1)]
    return sorted(times)[len(times) // 2], False


class AutoBackend:
    name = "auto"

    def __init__(self, candidates: dict, reps: int = 3):
        self.candidates = candidates  # name -> backend object, timed in this order (the reference first)
        self.reps = reps  # medians of 3 after a warm-up: enough to separate 1.3x, cheap once per setting
        self.choices = weakref.WeakKeyDictionary()  # layer -> {(shape, dtype, mode, mask_version): record}

    def _choose(self, layer, x, op: str) -> str:
        train = torch.is_grad_enabled() and (x.requires_grad or layer.values.requires_grad)
        mode = "train" if train else "infer"
        key = (setting(x, op), x.dtype, mode, layer.mask_version)
        records = self.choices.setdefault(layer, {})
        if key in records:
            return records[key]["choice"]
        record = {"ms": {}}
        for name in sorted(self.candidates, key=lambda n: n != "torch"):
            best = min(record["ms"].values(), default=None)
            if name == "native" and best is not None and best > DROP_ABOVE_MS:
                ratio = predicted_native_over_torch(layer, x, op)
                if ratio > SKIP_PREDICTED:
                    record.setdefault("skipped", {})[name] = f"predicted {ratio:.0f}x slower than torch"
                    continue
            try:
                ms, dropped = _timed(self._step(layer, x, op, self.candidates[name], train), self.reps, best)
            except SiftcError as e:  # e.g. no compiler: that candidate is out
                record.setdefault("errors", {})[name] = str(e)
                continue
            record["ms"][name] = ms
            if dropped:
                record.setdefault("dropped", []).append(name)
        record["choice"] = min(record["ms"], key=record["ms"].get)
        records[key] = record
        layer.auto_choice = record
        return record["choice"]

    @staticmethod
    def _step(layer, x, op, backend, train: bool):
        """One call of `backend` on copies of `x` and of the layer's values: forward and backward when
        `train`, else the forward alone."""
        values = layer.values.detach().clone().requires_grad_(train)
        xin = x.detach().clone().requires_grad_(train and x.requires_grad)

        def step():
            with torch.set_grad_enabled(train):
                saved = layer.values
                try:
                    layer._parameters["values"] = values
                    y = getattr(backend, op)(layer, xin)
                    if train:
                        return torch.autograd.grad(y.sum(), [values] + ([xin] if xin.requires_grad else []))
                    return y
                finally:
                    layer._parameters["values"] = saved
        return step

    def choices_of(self, model) -> dict:
        """The choices in force at the current masks of `model`'s layers, as plain data for a checkpoint
        (no objects, so `torch.load(weights_only=True)` reads it):

            {"0.branches.1": [{"shape": [16, 64], "dtype": "float32", "mode": "train", "choice": "native",
                               "ms": {"native": 0.04, "torch": 0.07}}]}

        ("shape": the setting's, batch rounded up to a power of two.) Choices for earlier masks are left
        out: a layer never goes back to one."""
        out = {}
        for name, layer in model.named_modules():
            now = [{"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "mode": mode, **record}
                   for (shape, dtype, mode, version), record in self.choices.get(layer, {}).items()
                   if version == layer.mask_version]
            if now:
                out[name] = now
        return out

    def restore(self, model, saved: dict):
        """Take back `choices_of(model)`'s data, for each layer at its mask as it is now (loading a state
        dict gives it a new mask_version), so none of them is timed again. Records from before settings
        had a mode (exact shapes, training) are read as training choices at their shape's setting."""
        for name, records in saved.items():
            layer = model.get_submodule(name)
            mine = self.choices.setdefault(layer, {})
            for r in records:
                dtype = getattr(torch, r["dtype"], None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"{name}: {r['dtype']!r} is not a torch dtype")
                shape = list(r["shape"])
                shape[0] = _bucket(int(shape[0]))
                record = {k: v for k, v in r.items() if k not in ("shape", "dtype", "mode")}
                mine[(tuple(shape), dtype, r.get("mode", "train"), layer.mask_version)] = record
                layer.auto_choice = record

    def _backend(self, layer, x, op: str):
        """The backend for this call. A graph being captured (torch.fx's symbolic trace, which hands a
        Proxy; torch.jit's trace, as the ONNX exporter does; torch.compile / torch.export) has nothing to
        time and must not branch on its inputs: it gets the reference, masked dense, recording nothing."""
        if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self.candidates["torch"]
        return self.candidates[self._choose(layer, x, op)]

    def linear(self, layer, x):
        return self._backend(layer, x, "linear").linear(layer, x)

    def conv2d(self, layer, x):
        return self._backend(layer, x, "conv2d").conv2d(layer, x)

    def conv1d(self, layer, x):
        return self._backend(layer, x, "conv1d").conv1d(layer, x)
