"""siftc.trace: which tracer runs, how example inputs bind to the forward, leaves, the training flag,
and shape recording."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models_real import NanoGPT
from siftc.errors import TraceError, UsageError
from siftc.trace import bind_inputs, leaf_rule, node_shape, trace


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), 0.5, self.training))


def test_plain_fx_first_with_shapes_on_every_node():
    traced = trace(MLP(), (torch.randn(3, 8),))
    assert traced.how == "fx" and traced.guards is None
    shapes = {n.name: node_shape(n) for n in traced.gm.graph.nodes}
    assert shapes["fc1"] == (3, 16) and shapes["fc2"] == (3, 4)


def test_training_flag_is_read_through_the_graph_in_plain_fx():
    traced = trace(MLP(), (torch.randn(3, 8),))
    gm, x = traced.gm, torch.randn(64, 8)
    assert any(n.op == "get_attr" and n.target == "training" for n in gm.graph.nodes)
    gm.eval()
    assert torch.equal(gm(x), gm(x))
    gm.train()
    assert not torch.equal(gm(x), gm(x))


def test_shape_decisions_fall_back_to_the_concrete_tracer():
    traced = trace(NanoGPT(), (torch.randint(0, 96, (2, 16)),))
    assert traced.how == "concrete"
    assert [n.target for n in traced.gm.graph.nodes if n.op == "placeholder"] == ["idx"]
    assert any(n.target == "siftc_input_guard" for n in traced.gm.graph.nodes)  # it guards its assumptions


def test_inputs_bind_by_position_or_name():
    model = NanoGPT()
    ids = torch.randint(0, 96, (2, 16))
    assert list(bind_inputs(model, (ids,))) == ["idx"]
    assert list(bind_inputs(model, {"idx": ids})) == ["idx"]
    assert list(bind_inputs(model, ids)) == ["idx"]
    with pytest.raises(UsageError, match=r"3 example inputs given but NanoGPT.forward takes 2 \(idx, targets\)"):
        bind_inputs(model, (ids, ids, ids))

    class Star(nn.Module):
        def forward(self, *xs):
            return xs[0]

    with pytest.raises(UsageError, match="takes \\*xs: give the example inputs as a dict"):
        bind_inputs(Star(), (ids,))


def test_leaf_rule_matches_paths_and_class_names():
    rule = leaf_rule(("h.0.*", "LayerNorm"))
    model = NanoGPT()
    assert rule(model.h[0].attn, "h.0.attn") and rule(model.ln_f, "ln_f")
    assert not rule(model.h[1].attn, "h.1.attn")
    assert rule(nn.Linear(2, 2), "anything")  # a weight layer is always a leaf: the passes rewrite it
    with pytest.raises(UsageError, match="--leaf 'blocks.*' matches no module of NanoGPT"):
        trace(model, (torch.randint(0, 96, (2, 16)),), leaves=("blocks.*",))


def test_a_leaf_stays_one_call_module():
    traced = trace(NanoGPT(), (torch.randint(0, 96, (2, 16)),), leaves=("h.1",))
    called = {n.target for n in traced.gm.graph.nodes if n.op == "call_module"}
    assert "h.1" in called and not any(t.startswith("h.1.") for t in called)


def test_inputs_that_do_not_fit_name_the_layer():
    with pytest.raises(UsageError, match=r"does not fit the model at fc1 \(Linear\)"):
        trace(MLP(), (torch.randn(3, 5),))


def test_untraceable_code_is_one_trace_error():
    class Values(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.max() > 1 else x

    with pytest.raises(TraceError, match=r"cannot trace Values: `return self.fc\(x\) if x.max\(\) > 1 else x` "
                                         r"decides on tensor values at test_trace.py:\d+"):
        trace(Values(), (torch.randn(2, 4),))
