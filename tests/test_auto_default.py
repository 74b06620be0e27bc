"""One default backend, auto, for every sparse layer (convert, load, Python, `siftc train`), and what keeps
its first-call timing cheap: one choice per setting (batch rounded up to a power of two, training or
inference), the forward alone timed for inference, and a candidate that is clearly slower dropped early."""
import time

import torch
import siftc
from siftc.train.config import TrainConfig
from siftc.nn.sparse import SPARSE_LAYERS, SparseLinear, set_backend
from siftc.runtime import BACKENDS, DEFAULT
import siftc.runtime.auto as auto_module
from siftc.runtime.auto import AutoBackend
from siftc.runtime.masked import MaskedDense


class Recording:
    """A candidate that runs masked dense after sleeping `ms`, and records whether each call built a
    graph for a backward (grad mode on and an input that wants it)."""

    def __init__(self, ms: float = 0.0):
        self.inner, self.ms, self.calls = MaskedDense(), ms, []

    def linear(self, layer, x):
        time.sleep(self.ms / 1e3)
        y = self.inner.linear(layer, x)
        self.calls.append(y.requires_grad)
        return y


def fresh_auto(monkeypatch, **delays) -> AutoBackend:
    auto = AutoBackend({name: Recording(delays.get(name, 0.0)) for name in ("native", "torch")})
    monkeypatch.setitem(BACKENDS, "auto", auto)
    return auto


def test_converted_and_loaded_layers_start_on_the_one_default(tmp_path):
    assert DEFAULT == "auto" and TrainConfig("a", "d", "o").backend == DEFAULT
    gm = siftc.convert("examples/mlp.py:mlp", "wide", 0.75, seed=0)
    layers = [m for m in gm.modules() if isinstance(m, SPARSE_LAYERS)]
    assert layers and {m.backend for m in layers} == {"auto"}
    siftc.save(gm, tmp_path / "art")
    loaded = [m for m in siftc.load(tmp_path / "art").modules() if isinstance(m, SPARSE_LAYERS)]
    assert len(loaded) == len(layers) and {m.backend for m in loaded} == {"auto"}


def test_batches_that_round_to_one_power_of_two_share_a_choice(monkeypatch):
    auto = fresh_auto(monkeypatch)
    layer = set_backend(SparseLinear(16, 8, nnz=40), "auto")
    for batch in (5, 6, 8):
        layer(torch.randn(batch, 16))
    assert [k[0] for k in auto.choices[layer]] == [(8, 16)]
    layer(torch.randn(2, 3, 16))  # a Linear's rows are all its leading dims: 6 -> 8, the same setting
    layer(torch.randn(9, 16))
    assert sorted(k[0] for k in auto.choices[layer]) == [(8, 16), (16, 16)]


def test_inference_times_the_forward_alone_and_is_its_own_setting(monkeypatch):
    auto = fresh_auto(monkeypatch)
    layer = set_backend(SparseLinear(16, 8, nnz=40), "auto")
    with torch.no_grad():
        layer(torch.randn(4, 16))
    timing = list(auto.candidates["torch"].calls)
    assert timing and not any(timing), "no timed call built a backward graph under no_grad"
    assert layer.auto_choice is auto.choices[layer][((4, 16), torch.float32, "infer", layer.mask_version)]
    layer(torch.randn(4, 16))  # with gradients: a training setting, timed with its backward
    assert {k[2] for k in auto.choices[layer]} == {"infer", "train"}
    assert auto.candidates["torch"].calls[len(timing):-1] and all(auto.candidates["torch"].calls[len(timing):])


def test_a_clearly_slower_candidate_is_dropped_after_its_warm_up(monkeypatch):
    auto = fresh_auto(monkeypatch, torch=2.0, native=30.0)  # the reference takes over 1 ms: drops allowed
    layer = set_backend(SparseLinear(64, 64, nnz=205), "auto")  # 5% at 64 rows: the cost model times it
    layer(torch.randn(64, 64))
    record = layer.auto_choice
    assert record["choice"] == "torch" and record["dropped"] == ["native"]
    assert len(auto.candidates["native"].calls) == 1  # its warm-up only, not 1 + reps
    assert len(auto.candidates["torch"].calls) == 1 + auto.reps + 1  # timed in full, then the real call


def test_fast_layers_are_timed_in_full(monkeypatch):
    monkeypatch.setattr(auto_module, "DROP_ABOVE_MS", 1e9)  # every call counts as fast (a loaded machine
    auto = fresh_auto(monkeypatch, native=5.0)                  # can take a millisecond for a tiny layer)
    layer = set_backend(SparseLinear(16, 8, nnz=40), "auto")
    layer(torch.randn(4, 16))
    assert "dropped" not in layer.auto_choice and layer.auto_choice["choice"] == "torch"
    assert len(auto.candidates["native"].calls) == 1 + auto.reps


def test_auto_matches_the_reference_on_a_converted_model():
    gm = siftc.convert("examples/mlp.py:mlp", "wide", 0.9, seed=0)
    x = torch.randn(32, 64)
    with torch.no_grad():
        got = gm(x)
        ref = set_backend(gm, "torch")(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_native_predicted_far_slower_is_not_timed(monkeypatch):
    auto = fresh_auto(monkeypatch, torch=2.0)  # the reference takes over 1 ms, so the cost model applies
    half = set_backend(SparseLinear(64, 64, nnz=2048), "auto")  # 50% unstructured, 4 rows padded to 16
    half(torch.randn(4, 64))
    assert auto.candidates["native"].calls == [] and half.auto_choice["choice"] == "torch"
    assert "predicted" in half.auto_choice["skipped"]["native"]
    sparse = set_backend(SparseLinear(64, 64, nnz=205), "auto")  # 5%, 64 rows: worth timing
    sparse(torch.randn(64, 64))
    assert "skipped" not in sparse.auto_choice and sparse.auto_choice["choice"] == "native"
    assert len(auto.candidates["native"].calls) == 1 + auto.reps + 1  # timed in full, then the real call


def test_a_graph_being_captured_runs_the_reference_and_records_nothing(monkeypatch):
    """torch.fx's symbolic trace (siftc flops, a second convert) and torch.jit's trace (the ONNX exporter)
    see one masked-dense graph: auto does not branch on a Proxy, nor time inside a trace."""
    auto = fresh_auto(monkeypatch)
    gm = siftc.convert("examples/mlp.py:mlp", "wide", 0.75, seed=0)
    layers = [m for m in gm.modules() if isinstance(m, SPARSE_LAYERS)]
    x = torch.randn(5, 64)
    traced = torch.fx.symbolic_trace(gm)  # traces through the sparse layers' forward
    jitted = torch.jit.trace(gm, (x,), check_trace=False)
    assert not any(auto.choices.get(m) for m in layers)
    assert auto.candidates["native"].calls == []  # each trace called the reference once per layer, untimed
    assert len(auto.candidates["torch"].calls) == 2 * len(layers)
    with torch.no_grad():
        assert torch.allclose(traced(x), gm(x)) and torch.allclose(jitted(x), gm(x))
    assert {len(auto.choices.get(m, {})) for m in layers} == {1}  # the eager call chose, once per layer
