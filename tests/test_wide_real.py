"""Sparse Wide (and the layer-wise kinds where a layer type is new) on models third parties wrote: tiny HF
GPT-2 (its Conv1D), Llama (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention), BERT, ViT and a
nanoGPT, plus nn.MultiheadAttention and grouped convolutions.

Each conversion runs once, in a module-scoped fixture; the checks read it. What must hold (DESIGN.md
section 3): iso-FLOP within 0.5%, the residual stream and the MLP width widen by k, attention heads keep
heads x head_dim, the converted model runs and gives the dense output's shape.
"""
import subprocess
import sys

import pytest
import torch
from torch import nn

import siftc
from siftc import layers, solve
from siftc.errors import UsageError
from siftc.passes.reshape_rules import HEADS

from models_real import NanoGPT, hf_models
from models_wide import AttentionBlock, GroupedBottleneck

SPARSITIES = (0.5, 0.75, 0.9)
# One member of each group the checks look at, per model: (stream, MLP, an attention projection's side).
MEMBERS = {
    "gpt2": ("transformer.h.1.attn.c_attn:in", "transformer.h.0.mlp.c_fc:out", "transformer.h.0.attn.c_proj:in"),
    "llama": ("model.layers.1.self_attn.o_proj:out", "model.layers.0.mlp.gate_proj:out",
              "model.layers.0.self_attn.q_proj:out"),
    "bert": ("bert.encoder.layer.1.attention.self.query:in", "bert.encoder.layer.0.intermediate.dense:out",
             "bert.encoder.layer.0.attention.self.query:out"),
    "vit": ("vit.layers.0.attention.q_proj:in", "vit.layers.1.mlp.fc1:out", "vit.layers.0.attention.q_proj:out"),
    "nanogpt": ("h.1.attn.c_attn:in", "h.0.c_fc:out", "h.0.attn.c_proj:in"),
}
# Members that must share the group of the first one (the stream reaches every block and the head; the
# SwiGLU product ties gate, up and down's input).
SAME_GROUP = {
    "gpt2": [("transformer.h.1.attn.c_attn:in", "transformer.wte:out"), ("transformer.h.1.attn.c_attn:in", "lm_head:in"),
             ("transformer.h.0.mlp.c_fc:out", "transformer.h.0.mlp.c_proj:in")],
    "llama": [("model.layers.1.self_attn.o_proj:out", "model.embed_tokens:out"),
              ("model.layers.1.self_attn.o_proj:out", "model.layers.0.input_layernorm.weight:dim0"),
              ("model.layers.1.self_attn.o_proj:out", "lm_head:in"),
              ("model.layers.0.mlp.gate_proj:out", "model.layers.0.mlp.up_proj:out"),
              ("model.layers.0.mlp.gate_proj:out", "model.layers.0.mlp.down_proj:in")],
    "bert": [("bert.encoder.layer.1.attention.self.query:in", "bert.embeddings.word_embeddings:out")],
    "vit": [("vit.layers.0.attention.q_proj:in", "vit.embeddings.patch_embeddings.projection:out")],
    "nanogpt": [("h.1.attn.c_attn:in", "wte:out"), ("h.0.c_fc:out", "h.0.c_proj:in")],
}
POINTS = [(m, s) for m in ("gpt2", "llama") for s in SPARSITIES] + \
         [(m, 0.75) for m in ("bert", "vit", "nanogpt")] + [("gpt2-eager", 0.75), ("llama-eager", 0.75)]


@pytest.fixture(scope="module")
def hf():
    return hf_models()


def _model(hf, name):
    """(model, inputs) of a name in POINTS; `-eager` runs HF's eager attention (repeat_kv, masks)."""
    if name == "nanogpt":
        return NanoGPT(), (torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0)),)
    base, _, attn = name.partition("-")
    model, inputs = hf[base]
    if attn:
        model.config._attn_implementation = attn
    return model.eval(), inputs


def _run(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out.logits if hasattr(out, "logits") else out[0]


class Wide:
    def __init__(self, hf, name, s):
        self.name, self.s = name, s
        self.model, self.inputs = _model(hf, name)
        with torch.no_grad():
            self.dense_out = _run(self.model, self.inputs)
        self.gm = siftc.convert(self.model, "wide", s, self.inputs)
        self.report = self.gm.siftc_info.report

    def group(self, member):
        found = [g for g in self.report["groups"] if member in g["members"]]
        assert len(found) == 1, f"{member} in {len(found)} groups"
        return found[0]


@pytest.fixture(scope="module", params=POINTS, ids=[f"{m}-{s}" for m, s in POINTS])
def wide(request, hf):
    return Wide(hf, *request.param)


def test_wide_is_iso_flop(wide):
    assert abs(wide.report["flop_ratio"] - 1) <= 0.005, wide.report["flop_ratio"]
    assert wide.report["transformed"] > 0


def test_wide_runs_with_the_dense_output_shape(wide):
    with torch.no_grad():
        out = _run(wide.gm.eval(), wide.inputs)
    assert out.shape == wide.dense_out.shape and torch.isfinite(out).all()


def test_wide_takes_another_batch_size(wide):
    """Sizes read off the input (batch, sequence) stay live: HF BERT expands its attention mask to the
    batch size read off the hidden states, which once became the example's constant 2."""
    if wide.name == "nanogpt":
        pytest.skip("NanoGPT's example is positional; the HF models cover the attention masks")
    double = {k: torch.cat([v, v]) for k, v in wide.inputs.items()}
    with torch.no_grad():
        once, twice = _run(wide.gm.eval(), wide.inputs), _run(wide.gm, double)
    torch.testing.assert_close(twice, torch.cat([once, once]), rtol=1e-4, atol=1e-5)


def test_stream_and_mlp_widen_by_k_and_heads_keep_their_width(wide):
    key = wide.name.partition("-")[0]
    stream, mlp, heads = (wide.group(m) for m in MEMBERS[key])
    for g in (stream, mlp):
        assert g["widened"] and g["new_width"] == solve.wide_width(g["width"], wide.s), g
    assert not heads["widened"] and heads["fixed"] == HEADS
    for first, other in SAME_GROUP[key]:
        assert other in wide.group(first)["members"], (first, other)


def test_every_hidden_weight_layer_is_sparse(wide):
    kinds = {r["name"]: r["kind"] for r in wide.report["layers"]}
    hidden = [n for n in kinds if ".h." in f".{n}" or "layers." in n or "encoder." in n]
    assert hidden and all(kinds[n] == "wide" for n in hidden), kinds


# ---- GPT-2's Conv1D: one entry in the layer table, every kind ------------------------------------------
def test_conv1d_is_a_transposed_linear_known_without_importing_transformers():
    code = "import sys, siftc, siftc.passes; assert 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    from transformers.pytorch_utils import Conv1D
    conv = Conv1D(24, 16)  # nf=24 out, nx=16 in; weight (16, 24)
    t = layers.layer_type(conv)
    assert t.fan_in_out(conv) == (16, 24) and t.weight_shape(conv, {"in": 20, "out": 30}) == [20, 30]
    x = torch.randn(3, 5, 16)
    for kept in (t.sparse_copy(conv, conv.weight.numel(), None), t.dense_copy(conv)):
        kept.load_state_dict(t.torch_state(conv), strict=False)
        torch.testing.assert_close(kept(x), conv(x))


@pytest.mark.parametrize("kind", ["parallel", "factorized", "doped"])
def test_layerwise_kinds_transform_every_gpt2_conv1d(hf, kind):
    model, inputs = _model(hf, "gpt2")
    gm = siftc.convert(model, kind, 0.75, inputs)
    report = gm.siftc_info.report
    conv1d = [r for r in report["layers"] if ".h." in r["name"]]
    assert len(conv1d) == 8 and all(r["kind"] == kind for r in conv1d)
    assert abs(report["flop_ratio"] - 1) <= 0.005
    assert not any(type(m).__name__ == "Conv1D" for m in gm.modules())
    with torch.no_grad():
        assert _run(gm.eval(), inputs).shape == _run(model, inputs).shape


@pytest.mark.parametrize("kind", ["parallel", "doped", "wide"])
def test_kinds_that_keep_the_dense_weights_transpose_conv1d_correctly(hf, kind):
    """At sparsity 0, parallel (N=1), doped (rank 0) and wide (k=1) keep each Conv1D's weights: the
    converted GPT-2 computes the dense logits."""
    model, inputs = _model(hf, "gpt2")
    gm = siftc.convert(model, kind, 0.0, inputs)
    with torch.no_grad():
        torch.testing.assert_close(_run(gm.eval(), inputs), _run(model, inputs), atol=1e-5, rtol=1e-5)


# ---- nn.MultiheadAttention that cannot be split: left as is, its widths kept, said so --------------------
def _unsplittable(need_weights=False):
    """AttentionBlock with an MHA siftc.nn.attention.unsupported refuses (add_bias_kv): it stays packed."""
    model = AttentionBlock(need_weights)
    model.attn = nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True)
    return model


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("kind", ["wide", "parallel", "factorized", "doped"])
def test_multihead_attention_is_skipped_with_its_reason(kind, need_weights):
    model = _unsplittable(need_weights).eval()
    x, = model.inputs()
    gm = siftc.convert(model, kind, 0.75, (x,))
    report = gm.siftc_info.report
    rec = {r["name"]: r for r in report["layers"]}
    assert rec["attn"]["kind"] == "skipped" and "in_proj_weight" in rec["attn"]["reason"]
    assert "not split into Linear layers: add_bias_kv=True" in rec["attn"]["reason"]  # the reason it stayed packed
    assert rec["attn"]["dense_shape"] == [96, 32] and rec["attn"]["search_space"] == 4 * 32 * 32
    assert rec["fc1"]["kind"] == rec["fc2"]["kind"] == kind
    assert abs(report["flop_ratio"] - 1) <= 0.005
    assert type(gm.get_submodule("attn")) is nn.MultiheadAttention
    with torch.no_grad():
        assert gm.eval()(x).shape == model(x).shape
    if kind == "wide":  # the stream MHA reads keeps its width; the MLP's hidden width still widens
        groups = {m: g for g in report["groups"] for m in g["members"]}
        assert not groups["ln:d0"]["widened"] and "MultiheadAttention" in groups["ln:d0"]["fixed"]
        assert groups["fc1:out"]["widened"] and groups["fc1:out"]["new_width"] == solve.wide_width(64, 0.75)


def test_multihead_attention_is_an_error_with_strict():
    model = _unsplittable()
    with pytest.raises(UsageError, match="--strict: cannot transform attn"):
        siftc.convert(model, "parallel", 0.5, model.inputs(), strict=True)


# ---- grouped convs widen by their number of groups -------------------------------------------------------
@pytest.fixture(scope="module", params=SPARSITIES)
def grouped(request):
    model = GroupedBottleneck().eval()
    return model, request.param, siftc.convert(model, "wide", request.param, model.inputs())


def test_grouped_conv_widens_by_its_groups_with_the_group_width_kept(grouped):
    model, s, gm = grouped
    report = gm.siftc_info.report
    assert abs(report["flop_ratio"] - 1) <= 0.005
    g, dense = gm.get_submodule("g"), model.g
    groups = solve.wide_width(16, s)
    assert g.groups == groups and (g.in_channels, g.out_channels) == (4 * groups, 4 * groups)
    assert g.weight.shape[1] == 4 and g.weight.numel() == dense.weight.numel() * groups // 16  # k, not k^2
    assert gm.get_submodule("c1").out_channels == gm.get_submodule("c2").in_channels == 4 * groups
    rec = {r["name"]: r for r in report["layers"]}
    assert rec["g"]["kind"] == "dense" and f"groups=16 -> {groups}" in rec["g"]["reason"]
    assert rec["c1"]["kind"] == rec["c2"]["kind"] == "wide"
    x, = model.inputs()
    with torch.no_grad():
        assert gm.eval()(x).shape == model(x).shape


def test_grouped_conv_too_costly_is_not_blamed_on_kept_dense_layers():
    model = GroupedBottleneck()
    with pytest.raises(UsageError) as e:
        siftc.convert(model, "wide", 0.9, model.inputs(), keep_dense=["c1"])  # c2 alone pays for g and c1
    assert "layers no kind sparsifies (g)" in str(e.value) and "kept-dense layers (c1)" in str(e.value)


def test_rms_norm_module_follows_the_stream_it_normalises():
    model = nn.Sequential(nn.Linear(6, 32), nn.RMSNorm(32), nn.Linear(32, 32), nn.RMSNorm(32), nn.Linear(32, 2))
    x = torch.randn(4, 6)
    gm = siftc.convert(model, "wide", 0.75, (x,))
    assert gm.get_submodule("1").normalized_shape == (64,) == gm.get_submodule("3").normalized_shape
    assert abs(gm.siftc_info.report["flop_ratio"] - 1) <= 0.005 and gm(x).shape == (4, 2)


def test_widen_heads_on_llama_widens_v_and_keeps_the_rotary_head_dim(hf):
    """--widen-heads: v's and o_proj's head_dim widen; q's and k's stay, since rotate_half slices them in
    halves (a slice fixes a width) and the report says so."""
    model, inputs = _model(hf, "llama")
    gm = siftc.convert(model, "wide", 0.75, inputs, widen_heads=True)
    report = gm.siftc_info.report
    groups = {m.split(" ")[0]: g for g in report["groups"] for m in g["members"]}
    v, q = groups["model.layers.0.self_attn.v_proj:out"], groups["model.layers.0.self_attn.q_proj:out[0:32]"]
    assert v["widened"] and v["new_width"] == 2 * v["width"]
    assert not q["widened"] and q["fixed"].startswith("sliced by")
    assert abs(report["flop_ratio"] - 1) <= 0.005
    with torch.no_grad():
        assert _run(gm.eval(), inputs).shape == _run(model, inputs).shape
