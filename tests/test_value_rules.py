"""siftc.value_rules: a rule's value is the value fake dispatch computes (shape, strides, dtype, grad),
calls a rule does not know are dispatched, and hooks still see and shape the value."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from siftc import value_rules
from siftc.concrete_trace import concrete_trace


@pytest.fixture
def fake():
    """(mode, fake(t)): a fake mode whose tensors have one symbol per dim, as the concrete tracer's."""
    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False), allow_non_fake_inputs=True)

    def make(t):
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext([DimDynamic.DYNAMIC] * t.dim()))
    return mode, make


def _meta(t):
    return str(t.shape), str(t.stride()), t.dtype, t.device, t.requires_grad


def _conv1d():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    return Conv1D(12, 8)


CASES = [  # (module, input)
    (lambda: nn.Linear(8, 12), lambda: torch.randn(2, 5, 8)),
    (lambda: nn.Linear(8, 12), lambda: torch.randn(5, 2, 8).transpose(0, 1)),   # non-contiguous
    (lambda: nn.Linear(8, 12, bias=False), lambda: torch.randn(3, 8)),
    (_conv1d, lambda: torch.randn(2, 5, 8)),
    (lambda: nn.Embedding(10, 6), lambda: torch.randint(0, 10, (2, 5))),
    (lambda: nn.Embedding(10, 6), lambda: torch.randint(0, 10, (5, 2)).t()),
    (lambda: nn.LayerNorm(8), lambda: torch.randn(5, 2, 8).transpose(0, 1)),
    (lambda: nn.LayerNorm((5, 8), elementwise_affine=False), lambda: torch.randn(2, 5, 8)),
    (lambda: nn.RMSNorm(8), lambda: torch.randn(2, 5, 8)),
]


@pytest.mark.parametrize("make_module,make_input", CASES)
def test_a_rule_gives_the_dispatched_value(fake, make_module, make_input):
    mode, make = fake
    m, x = make_module(), make(make_input())
    rule = value_rules.module_rule(m)
    assert rule is not None
    with mode:
        want, got = m(x), rule(m, x)
        assert _meta(got) == _meta(want)
        with torch.no_grad():
            assert not rule(m, x).requires_grad


def test_sdpa_value_is_the_eval_value_whatever_the_dropout(fake):
    mode, make = fake
    q = make(torch.randn(2, 4, 6, 8))
    with mode:
        got = value_rules.sdpa(q, q, q, None, 0.1, True)
        want = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert _meta(got) == _meta(want)
        assert _meta(value_rules.sdpa(q, q, q, dropout_p=0.5)) == _meta(F.scaled_dot_product_attention(q, q, q))


def test_calls_a_rule_does_not_know_are_dispatched(fake):
    mode, make = fake
    lin = nn.Linear(8, 12)
    with mode:
        assert value_rules.linear(lin, make(torch.randn(2, 8, dtype=torch.double))) is None  # another dtype
        assert value_rules.linear(lin, make(torch.randn(2, 7))) is None                      # a wrong size
        assert value_rules.embedding(nn.Embedding(4, 2), make(torch.randn(2, 3))) is None    # float ids

    class Lora(nn.Linear):  # a subclass may change forward
        def forward(self, x):
            return super().forward(x)[..., :2]
    assert value_rules.module_rule(Lora(8, 12)) is None
    lin.register_forward_pre_hook(lambda m, args: None)
    assert value_rules.module_rule(lin) is None


class Hooked(nn.Module):
    """A forward hook cuts fc's output to 2 features; the forward asserts it (a shape decision)."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 12), nn.Linear(2, 3)
        self.calls = 0
        self.fc.register_forward_hook(self.cut)

    def cut(self, m, args, out):
        self.calls += 1
        return out[..., :2]

    def forward(self, x):
        h = self.fc(x)
        assert h.shape[-1] == 2
        return self.out(h)


def test_forward_hooks_see_and_shape_a_ruled_value():
    model = Hooked()
    x = torch.randn(2, 5, 8)
    gm, _ = concrete_trace(model, {"x": x})
    assert model.calls >= 1  # the hook ran on the traced value
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


# ---- ValueCache: a call made before with the same inputs -------------------------------------
class InPlaceOnRepeat(nn.Module):
    """The same transpose three times; an in-place unsqueeze_ on the second must not reach the others."""

    def forward(self, x):                         # (B, T)
        a, b = x.transpose(0, 1), x.transpose(0, 1)
        b.unsqueeze_(0)
        c = x.transpose(0, 1)
        assert a.dim() == 2 and b.dim() == 3 and c.dim() == 2
        return a + b + c                          # (1, T, B)


class ViewOfTranspose(nn.Module):
    """view(-1) of a contiguous (T, B) is cached; the same view of a transposed (T, B) is not allowed."""

    def forward(self, x):                         # (B, T)
        y = x.transpose(0, 1)
        return y.contiguous().view(-1) + y.view(-1)


def test_an_in_place_method_on_a_repeated_value_changes_only_its_own():
    x = torch.randn(2, 3)
    gm, _ = concrete_trace(InPlaceOnRepeat(), {"x": x})
    torch.testing.assert_close(gm(x), InPlaceOnRepeat()(x))


def test_a_cached_value_is_only_reused_for_the_same_strides():
    with pytest.raises(RuntimeError, match="view"):
        ViewOfTranspose()(torch.randn(2, 3))
    with pytest.raises(Exception, match="view"):
        concrete_trace(ViewOfTranspose(), {"x": torch.randn(2, 3)})


def test_repeated_calls_are_computed_once():
    cache = value_rules.ValueCache()
    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False), allow_non_fake_inputs=True)
    x = mode.from_tensor(torch.randn(2, 3))
    with mode:
        key = cache.key("call_method", "transpose", (x, 0, 1), {})
        assert key == cache.key("call_method", "transpose", (x.clone(), 0, 1), {})  # another tensor, same kind
        assert key != cache.key("call_method", "transpose", (x.t(), 0, 1), {})
        assert cache.key("call_method", "unsqueeze_", (x, 0), {}) is None           # in place
        assert cache.key("call_function", F.relu, (x,), {"inplace": True}) is None
        assert cache.key("call_function", max, (2, 3), {}) is None                  # no tensor
        cache.put(key, x.transpose(0, 1))
        assert cache.get(key) is cache.get(key)
