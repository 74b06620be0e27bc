"""Third-party code through the whole pipeline: nanoGPT-style shape checks and tiny HuggingFace models
(built from configs, random init) convert with every layer-wise kind, train, export and run on ONNX
Runtime and DeepSparse; the user's own prints never reach --json; --leaf keeps a module that branches on
values opaque. Sparse Wide on these models is tested in test_wide_real.py."""
import json
import subprocess
import sys

import onnx
import pytest
import torch
from torch import nn

import siftc
from models_real import NanoGPT, hf_models
from siftc.concrete_trace import ShapeMismatch
from siftc.errors import TraceError
from siftc.trace import trace

LAYERWISE = ("parallel", "factorized", "doped")
SPARSITIES = (0.5, 0.75, 0.9)


def _ids(b, t, vocab=96):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    models = hf_models()
    # Traced once per family and attention implementation; each conversion below starts from the traced
    # graph (a GraphModule is used as given), so the module tests every kind x sparsity without re-tracing.
    out = {}
    for name, (model, inputs) in models.items():
        for attn in ("sdpa", "eager"):
            model.config._attn_implementation = attn
            out[name, attn] = (model, inputs, trace(model, inputs).gm)
        model.config._attn_implementation = "sdpa"
        out[name] = out[name, "sdpa"]
    return out


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("kind", LAYERWISE)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "vit"])
def test_hf_every_layerwise_kind_is_iso_flop(hf, name, attn, kind, sparsity):
    model, inputs, traced = hf[name, attn]
    gm = siftc.convert(traced, kind, sparsity, inputs)
    report = gm.siftc_info.report
    assert abs(report["flop_ratio"] - 1) < 0.005
    assert report["transformed"] > 0
    assert report["trace"]["how"] == "given"
    gm.eval(), model.eval()
    out, ref = gm(**inputs), model(**inputs)
    assert type(out) is type(ref) and out.logits.shape == ref.logits.shape
    assert torch.isfinite(out.logits).all()


def test_hf_model_passed_as_is_traces_concretely(hf):
    model, inputs, _ = hf["llama"]
    gm = siftc.convert(model, "parallel", 0.75, inputs)
    trace = gm.siftc_info.report["trace"]
    assert trace["how"] == "concrete" and trace["inputs"] == ["input_ids"]
    assert "labels" in trace["constants"]  # left at its default, not a graph input


def test_converted_hf_model_trains_on_its_loss(hf):
    model, inputs, _ = hf["llama"]
    ids = inputs["input_ids"]
    gm = siftc.convert(model, "factorized", 0.75, {"input_ids": ids, "labels": ids})
    siftc.nn.sparse.set_backend(gm, "native")
    gm.train()
    opt = torch.optim.AdamW(gm.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = gm(ids, ids).loss  # positional, in the graph's input order
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return NanoGPT()


@pytest.mark.parametrize("kind", ["wide", *LAYERWISE])
def test_nanogpt_every_kind(nano, kind):
    gm = siftc.convert(nano, kind, 0.75, (_ids(2, 16),))
    report = gm.siftc_info.report
    assert abs(report["flop_ratio"] - 1) < 0.005
    texts = [s["text"] for s in report["trace"]["specializations"]]
    assert any("assert t <= self.config.block_size" in t for t in texts), texts
    gm.eval()
    logits, loss = gm(_ids(3, 16))  # another batch size: the graph serves it
    assert logits.shape == (3, 1, 96) and loss is None


def test_converted_model_refuses_a_shape_it_was_specialised_against(nano):
    gm = siftc.convert(nano, "parallel", 0.5, (_ids(2, 16),))
    with pytest.raises(ShapeMismatch, match=r"input idx dim 1 = 40: .*assert t <= self.config.block_size"):
        gm(_ids(2, 40))


def test_converted_dropout_follows_train_and_eval(nano):
    gm = siftc.convert(nano, "doped", 0.5, (_ids(2, 16),))
    x = _ids(2, 16)
    gm.train()
    assert not torch.equal(gm(x)[0], gm(x)[0])
    gm.eval()
    assert torch.equal(gm(x)[0], gm(x)[0])


def test_onnx_of_a_training_branch_model_has_no_training_dropout(nano, tmp_path):
    gm = siftc.convert(nano, "parallel", 0.5, (_ids(2, 16),))
    from siftc.export import export
    export(gm, tmp_path / "nano.onnx", batch=2)
    graph = onnx.load(str(tmp_path / "nano.onnx")).graph
    dropouts = [n for n in graph.node if n.op_type == "Dropout"]
    # A Dropout node either is absent or runs with training_mode off (a constant False input).
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    for d in dropouts:
        assert len(d.input) < 3 or d.input[2] in consts and not onnx.numpy_helper.to_array(
            consts[d.input[2]].attribute[0].t).any()


def test_a_defaulted_float_argument_is_a_constant():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x, scale: float = 1.0):
            return self.c(torch.relu(self.b(torch.relu(self.a(x))))) * scale

    for kind in ("wide", *LAYERWISE):
        gm = siftc.convert(Scaled(), kind, 0.75, (torch.randn(2, 8),))
        assert gm.siftc_info.report["trace"]["constants"] == {"scale": "1.0"}
        assert gm(torch.randn(5, 8)).shape == (5, 4)


class Routed(nn.Module):
    """A submodule that branches on tensor values: only --leaf can take it."""

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(16, 16)

        def forward(self, x):
            return self.gate(x) if x.mean() > 0 else x

    def __init__(self):
        super().__init__()
        self.a, self.router, self.b, self.c = nn.Linear(8, 16), self.Router(), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.router(torch.relu(self.a(x))))))


def test_branch_on_values_names_the_module_and_leaf_takes_it():
    with pytest.raises(TraceError, match=r"x.mean\(\) > 0.*--leaf 'router'"):
        siftc.convert(Routed(), "parallel", 0.5, (torch.randn(2, 8),))
    model = Routed()
    gm = siftc.convert(model, "parallel", 0.5, (torch.randn(2, 8),), leaf=["router"])
    assert "router" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert abs(gm.siftc_info.report["flop_ratio"] - 1) < 0.005
    with pytest.raises(Exception, match="--leaf 'nothing' matches no module"):
        siftc.convert(model, "parallel", 0.5, (torch.randn(2, 8),), leaf=["nothing"])


def test_graph_module_is_used_as_given():
    model = Routed.Router()
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                               nn.Linear(16, 4)))
    out = siftc.convert(gm, "factorized", 0.5, (torch.randn(2, 8),))
    assert out.siftc_info.report["trace"]["how"] == "given"
    assert isinstance(model, nn.Module) and out is not gm


BERT_FILE = '''
import torch
import transformers as tf

print("hello from the model file")  # must not reach --json on stdout


def build():
    cfg = tf.BertConfig(vocab_size=128, max_position_embeddings=64, num_hidden_layers=2, hidden_size=64,
                        num_attention_heads=4, intermediate_size=128, num_labels=3)
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(cfg)


def example_inputs():
    return {"input_ids": torch.randint(0, 128, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
'''


def _siftc(*args, cwd):
    return subprocess.run(["siftc", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_hf_model_file_converts_exports_and_runs_on_every_engine(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "bert.py").write_text(BERT_FILE)
    r = _siftc("convert", "bert.py", "--kind", "wide", "--sparsity", "0.75", "-o", "art", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # the model file's print went to stderr
    assert "hello from the model file" in r.stderr
    assert report["trace"]["inputs"] == ["input_ids", "attention_mask"]
    assert abs(report["flop_ratio"] - 1) < 0.005
    r = _siftc("inspect", "art", cwd=tmp_path)
    assert r.returncode == 0 and "traced with concrete shapes" in r.stdout and "labels = None" in r.stdout
    assert "self-contained: loads without the model file" in r.stdout
    (tmp_path / "bert.py").unlink()  # the artifact holds its graph and output structure as data
    r = _siftc("export", "art", "-o", "bert.onnx", "--batch", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "the outputs, which vary with the input" in r.stdout
    r = _siftc("bench", "bert.onnx", "--engine", "deepsparse,onnxruntime", "--batch", "2", "--time", "0.5",
               "--warmup", "2", "--json", "bench.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert {row["engine"] for row in rows} == {"deepsparse", "onnxruntime"}
    assert all(row["p50_ms"] > 0 for row in rows)


HF_KINDS = {"gpt2": "parallel", "bert": "factorized", "llama": "doped", "vit": "wide"}
HF_FRESH = """
import sys, torch, siftc
torch.set_num_threads(int(sys.argv[1]))  # the parent's: another thread count sums in another order
expected = torch.load("io.pt")
for name, (inputs, cls, logits) in expected.items():
    gm = siftc.set_backend(siftc.load(name), "torch").eval()  # no trust_source: built from graph.json
    with torch.no_grad():
        out = gm(**inputs)
    assert type(out).__module__ + "." + type(out).__name__ == cls, (name, type(out))
    assert torch.equal(out.logits, logits), name
print("ok")
"""


def test_hf_artifacts_load_in_a_fresh_process_without_trust_and_export(tmp_path):
    """Each HF family, converted by concrete tracing (input guard, ModelOutput outputs), saved and loaded
    in a new process with no trust: the same output class and bit-identical logits; one exports."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    expected = {}
    for name, (model, inputs) in hf_models().items():
        gm = siftc.set_backend(siftc.convert(model, HF_KINDS[name], 0.75, inputs, seed=1), "torch")  # exact: one backend
        art = siftc.save(gm, tmp_path / name)
        meta = json.loads((art / "siftc.json").read_text())
        assert meta["needs_source"] is None and meta["notes"] == [], meta["needs_source"]
        with torch.no_grad():
            out = gm.eval()(**inputs)
        expected[name] = (inputs, f"{type(out).__module__}.{type(out).__name__}", out.logits)
    torch.save(expected, tmp_path / "io.pt")
    run = subprocess.run([sys.executable, "-c", HF_FRESH, str(torch.get_num_threads())], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    for name in ("bert", "vit"):  # (gpt2's and llama's graphs fail torch.onnx.export, loaded or not)
        r = _siftc("export", name, "-o", f"{name}.onnx", "--batch", "2", cwd=tmp_path)
        assert r.returncode == 0 and (tmp_path / f"{name}.onnx").is_file(), r.stderr
