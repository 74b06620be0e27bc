"""SplitAttention (siftc.nn.attention): nn.MultiheadAttention as four Linear layers, equal to MHA on
every forward option, traceable, exportable, and convertible by every kind at the dense FLOPs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import siftc
from siftc import solve
from siftc.nn.attention import SplitAttention, split_attention, unsupported

E, H, B, L, S = 16, 4, 3, 5, 7


def _mha(batch_first=True, bias=True, kdim=None, vdim=None, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
    with torch.no_grad():  # MHA starts its biases at zero: random ones show a wrong bias slice
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    return mha.eval()


def _qkv(batch_first, kdim=E, vdim=E, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda t, e: (B, t, e)) if batch_first else (lambda t, e: (t, B, e))
    return (torch.randn(shape(L, E), generator=g), torch.randn(shape(S, kdim), generator=g),
            torch.randn(shape(S, vdim), generator=g))


def _padding(kind):
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -2:] = pad[2, -1] = True  # True = ignore; no row is fully masked
    return pad if kind == "bool" else torch.zeros(B, S).masked_fill(pad, -1e4)


def _attn_mask(kind):
    m = torch.zeros(L, S, dtype=torch.bool)
    m[1, 0] = m[3, 2:4] = True
    if kind == "bool":
        return m
    if kind == "float":
        return torch.randn(L, S).masked_fill(m, float("-inf"))
    if kind == "3d":  # one (L, S) mask per batch x head
        return torch.randn(B * H, L, S)
    if kind == "causal":  # L x S with the diagonal aligned top-left, as is_causal assumes
        return torch.ones(L, S, dtype=torch.bool).triu(1)
    return None


CASES = [  # (batch_first, bias, key_padding_mask, attn_mask, is_causal, need_weights, average_attn_weights)
    (True, True, None, None, False, True, True),
    (False, True, None, None, False, True, True),
    (True, False, None, None, False, False, True),
    (False, False, None, None, False, True, False),
    (True, True, "bool", None, False, True, True),
    (False, True, "float", None, False, False, True),
    (True, True, None, "bool", False, False, True),
    (True, True, None, "float", False, True, False),
    (False, True, None, "3d", False, False, True),
    (True, True, "bool", "bool", False, True, True),
    (True, True, "float", "float", False, False, True),
    (True, True, None, "causal", True, False, True),
    (False, True, None, "causal", True, True, True),
    (True, True, "bool", "causal", True, False, True),
]


@pytest.mark.parametrize("batch_first,bias,kpm,mask,causal,need_weights,average", CASES)
def test_split_attention_equals_mha(batch_first, bias, kpm, mask, causal, need_weights, average):
    mha = _mha(batch_first, bias)
    split = SplitAttention.from_mha(mha)
    q, k, v = _qkv(batch_first)
    kwargs = dict(key_padding_mask=_padding(kpm) if kpm else None, need_weights=need_weights,
                  attn_mask=_attn_mask(mask), average_attn_weights=average, is_causal=causal)
    with torch.no_grad():
        want, want_w = mha(q, k, v, **kwargs)
        got, got_w = split(q, k, v, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if need_weights:
        assert got_w.shape == want_w.shape == ((B, L, S) if average else (B, H, L, S))
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
    else:
        assert got_w is None and want_w is None


@pytest.mark.parametrize("need_weights", [True, False])
def test_kdim_vdim_and_self_attention(need_weights):
    mha = _mha(kdim=6, vdim=10)
    split = SplitAttention.from_mha(mha)
    assert split.k_proj.in_features == 6 and split.v_proj.in_features == 10
    q, k, v = _qkv(True, 6, 10)
    with torch.no_grad():
        torch.testing.assert_close(split(q, k, v, need_weights=need_weights)[0],
                                   mha(q, k, v, need_weights=need_weights)[0], atol=1e-5, rtol=1e-5)
        mha = _mha()  # self-attention: MHA's eval fast path, one tensor for query, key and value
        torch.testing.assert_close(SplitAttention.from_mha(mha)(q, q, q)[0], mha(q, q, q)[0], atol=1e-5, rtol=1e-5)


def test_is_causal_without_a_mask_is_refused_like_mha():
    mha = _mha()
    q, k, v = _qkv(True)
    with pytest.raises(RuntimeError):
        mha(q, k, v, is_causal=True)
    with pytest.raises(RuntimeError, match="is_causal needs attn_mask"):
        SplitAttention.from_mha(mha)(q, k, v, is_causal=True)


def test_gradients_equal_mha():
    mha = _mha().double()
    split = SplitAttention.from_mha(mha)
    q, k, v = (t.double().requires_grad_() for t in _qkv(True))
    pad = _padding("bool")
    mha(q, k, v, key_padding_mask=pad)[0].square().sum().backward()
    want_q, q.grad = q.grad, None
    split(q, k, v, key_padding_mask=pad)[0].square().sum().backward()
    torch.testing.assert_close(q.grad, want_q)
    w_q = mha.in_proj_weight.grad[:E]  # q's rows of the packed weight
    torch.testing.assert_close(split.q_proj.weight.grad, w_q)
    torch.testing.assert_close(split.out_proj.weight.grad, mha.out_proj.weight.grad)
    small = SplitAttention(4, 2, batch_first=True).double()
    x = torch.randn(1, 3, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: small(t, t, t, need_weights=False)[0], (x,))


def test_dropout_follows_training_mode():
    split = SplitAttention.from_mha(_mha(dropout=0.5).train())
    assert split.training
    q, k, v = _qkv(True)
    for need_weights in (True, False):
        torch.manual_seed(0)
        a = split(q, k, v, need_weights=need_weights)[0]
        b = split(q, k, v, need_weights=need_weights)[0]
        assert not torch.allclose(a, b)  # dropout active
    split.eval()
    torch.testing.assert_close(split(q, k, v)[0], split(q, k, v)[0])


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln(x)), then x + MLP(ln2(x)). With `io`, a Linear in
    and out (kept dense, the paper's first and last layer), so the residual stream is no model input
    and Sparse Wide can widen it."""

    def __init__(self, d=32, heads=4, need_weights=False, io=False):
        super().__init__()
        self.need_weights = need_weights
        self.inp, self.head = (nn.Linear(d, d), nn.Linear(d, 3)) if io else (nn.Identity(), nn.Identity())
        self.ln, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):                                                  # (B, T, d)
        x = self.inp(x)
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=self.need_weights)[0]
        return self.head(x + self.fc2(F.gelu(self.fc1(self.ln2(x)))))     # (B, T, d or 3)


class MaskedBlock(Block):
    def forward(self, x, pad, mask):
        h = self.ln(x)
        return x + self.attn(h, h, h, key_padding_mask=pad, attn_mask=mask, need_weights=self.need_weights)[0]


def test_split_attention_replaces_in_place_and_keeps_mode_device_dtype():
    model = nn.Sequential(Block(), Block()).double().eval()
    model.add_module("again", model[0])  # one block under two names
    model.add_module("alias", nn.Module())
    model.alias.attn = model[1].attn  # one MHA under two parents
    odd = nn.MultiheadAttention(32, 4, add_bias_kv=True)
    model[1].add_module("odd", odd)
    x = torch.randn(2, 8, 32, dtype=torch.double)
    with torch.no_grad():
        want = model[1](model[0](x))
    names = split_attention(model)
    assert sorted(names) == ["0.attn", "1.attn", "again.attn", "alias.attn"]
    assert type(model[0].attn) is SplitAttention and model.again.attn is model[0].attn
    assert model.alias.attn is model[1].attn
    assert model[1].odd is odd and "add_bias_kv" in unsupported(odd)
    assert model[0].attn.q_proj.weight.dtype == torch.double and not model[0].attn.training
    with torch.no_grad():
        torch.testing.assert_close(model[1](model[0](x)), want)
    assert split_attention(model) == []  # nothing left to split


def test_unsupported_configurations_are_named():
    assert unsupported(_mha()) is None
    assert "add_zero_attn" in unsupported(nn.MultiheadAttention(E, H, add_zero_attn=True))
    assert "add_bias_kv" in unsupported(nn.MultiheadAttention(E, H, add_bias_kv=True))

    class Mine(nn.MultiheadAttention):
        pass
    assert "subclasses" in unsupported(Mine(E, H))
    with pytest.raises(ValueError, match="add_zero_attn"):
        SplitAttention.from_mha(nn.MultiheadAttention(E, H, add_zero_attn=True))


def _masked_model(need_weights):
    model = MaskedBlock(need_weights=need_weights).eval()
    split_attention(model)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, -3:] = True
    return model, (torch.randn(2, 8, 32), pad, torch.zeros(8, 8).masked_fill(torch.eye(8, dtype=torch.bool).roll(1, 1), -1e4))


@pytest.mark.parametrize("need_weights", [False, True])
def test_symbolic_trace_has_the_projections_as_modules(need_weights):
    model, inputs = _masked_model(need_weights)
    gm = torch.fx.symbolic_trace(model)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"} <= targets
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))


@pytest.mark.parametrize("need_weights", [False, True])
def test_onnx_export_runs_on_onnxruntime(tmp_path, need_weights):
    ort = pytest.importorskip("onnxruntime")
    model, inputs = _masked_model(need_weights)
    path = tmp_path / "attn.onnx"
    torch.onnx.export(model, inputs, str(path), input_names=["x", "pad", "mask"], dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {k: t.numpy() for k, t in zip(["x", "pad", "mask"], inputs)})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(*inputs), atol=1e-5, rtol=1e-5)


# ---- conversion: siftc.convert splits MHA; every kind transforms the projections, iso-FLOP ----------
class Encoder(nn.Module):
    """Linear in, a plain nn.MultiheadAttention (either batch layout), an MLP, Linear out: a model as a
    user writes it, converted without calling split_attention first."""

    def __init__(self, batch_first=True, d=32, heads=4):
        super().__init__()
        self.inp, self.head = nn.Linear(12, d), nn.Linear(d, 3)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):                                    # (B, T, 12), or (T, B, 12) if not batch_first
        h = self.inp(x)
        h = self.ln(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


def _projections_transformed(report, kind):
    rec = {r["name"]: r for r in report["layers"]}
    return all(rec[f"attn.{p}_proj"]["kind"] == kind for p in ("q", "k", "v", "out"))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("kind", ["wide", "parallel", "factorized", "doped"])
def test_convert_splits_attention_of_a_block(kind, sparsity, need_weights):
    model = Block(io=True, need_weights=need_weights).eval()
    x = torch.randn(2, 8, 32)
    gm = siftc.convert(model, kind, sparsity, (x,))
    assert type(model.attn) is nn.MultiheadAttention  # the user's model is left as it was
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())  # traced through its split
    report = gm.siftc_info.report
    assert _projections_transformed(report, kind)
    assert abs(report["flop_ratio"] - 1) <= 0.005
    with torch.no_grad():
        assert gm.eval()(x).shape == model(x).shape == (2, 8, 3)
    if kind == "wide":  # the residual stream and the MLP widen; heads x head_dim keep their width
        groups = {m: g for g in report["groups"] for m in g["members"]}
        assert groups["ln:d0"]["widened"] and groups["ln:d0"]["new_width"] == solve.wide_width(32, sparsity)
        assert groups["fc1:out"]["widened"]
        assert not groups["attn.q_proj:out"]["widened"] and "heads" in groups["attn.q_proj:out"]["fixed"]


def test_dense_flops_count_the_projections():
    model = Block(io=True).eval()
    x = torch.randn(2, 8, 32)
    report = siftc.convert(model, "parallel", 0.5, (x,)).siftc_info.report
    tokens, d = 2 * 8, 32
    linears = d * d + 4 * d * d + 4 * d * d + 4 * d * d + d * 3  # inp, q/k/v/out, fc1, fc2, head
    assert report["dense_flops"] == 2 * tokens * linears


def test_a_leaf_pattern_keeps_an_attention_packed():
    model = Block(io=True).eval()
    gm = siftc.convert(model, "parallel", 0.5, (torch.randn(2, 8, 32),), leaf=("MultiheadAttention",))
    assert type(gm.get_submodule("attn")) is nn.MultiheadAttention
    assert {r["name"]: r for r in gm.siftc_info.report["layers"]}["attn"]["kind"] == "skipped"


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_inside_a_torch_layer_stays_as_its_layer_expects(batch_first):
    """nn.TransformerEncoderLayer is a leaf (it runs as one module) and reads its self_attn's MHA
    attributes (in_proj_bias) on its eval fast path: its MHA is not split."""
    model = nn.Sequential(nn.Linear(8, 32), nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first),
                          nn.Linear(32, 32), nn.Linear(32, 3)).eval()
    x = torch.randn(2, 5, 8)
    gm = siftc.convert(model, "parallel", 0.5, (x,))
    assert type(gm.get_submodule("1").self_attn) is nn.MultiheadAttention
    with torch.no_grad():
        assert gm.eval()(x).shape == (2, 5, 3)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["wide", "parallel", "factorized", "doped"])
def test_plain_mha_model_converts_at_high_sparsity_and_exports(tmp_path, kind, batch_first):
    from siftc.export import ATOL, RTOL, export as export_onnx
    from siftc.source import make_inputs
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Encoder(batch_first).eval()
    x = torch.randn((2, 6, 12) if batch_first else (6, 2, 12))
    gm = siftc.convert(model, kind, 0.9, (x,))
    report = gm.siftc_info.report
    assert _projections_transformed(report, kind)
    assert abs(report["flop_ratio"] - 1) <= 0.005
    with torch.no_grad():
        assert gm.eval()(x).shape == model(x).shape == x.shape[:2] + (3,)
    done = export_onnx(gm, tmp_path / "m.onnx", batch=x.shape[0])  # dim 0: the batch, or the sequence
    assert done.meta["checks"]["sparsity"] == "passed"
    inputs = make_inputs(gm.siftc_info.example_inputs, x.shape[0], seed=5)
    sess = ort.InferenceSession(str(done.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), gm.eval()(*inputs), atol=ATOL, rtol=RTOL)
