"""Concrete-shape tracing: shape decisions resolve on the example inputs, are recorded as guards, and
a later input the graph cannot serve is refused; values stay untraceable; training flags stay live."""
import pytest
import torch
from torch import nn

from models_real import Decides, NanoGPT, OnValues, ShortPath, hf_models
from siftc.concrete_trace import DataDependent, Guards, ShapeMismatch, concrete_trace


def _ids(b, t, vocab=96):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(b * 100 + t))


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    model = NanoGPT()
    gm, guards = concrete_trace(model, {"idx": _ids(2, 16)})
    return model, gm, guards


def test_nanogpt_traces_module_level_and_matches(nano):
    model, gm, _ = nano
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert linears <= called  # Linear layers stay call_module leaves: the passes see them
    model.eval(), gm.eval()
    for b, t in [(2, 16), (3, 16)]:  # another batch size is served by the same graph
        logits, loss = gm(_ids(b, t))
        assert loss is None
        torch.testing.assert_close(logits, model(_ids(b, t))[0])


def test_defaulted_argument_is_a_constant_not_an_input(nano):
    _, gm, guards = nano
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["idx"]
    assert guards.constants == {"targets": None}


def test_assert_on_the_sequence_length_is_a_guard(nano):
    _, _, guards = nano
    texts = [s.text for s in guards.specializations]
    assert any("input idx dim 1 = 16" in t and "assert t <= self.config.block_size" in t
               and "models_real.py:" in t for t in texts), texts
    guards.check({"idx": _ids(4, 16)})
    with pytest.raises(ShapeMismatch, match=r"input idx dim 1 = 40: .*assert t <= self.config.block_size"):
        guards.check({"idx": _ids(2, 40)})
    with pytest.raises(ShapeMismatch, match="has 1 dims"):
        guards.check({"idx": _ids(2, 16)[0]})


def test_guards_round_trip_through_json(nano):
    _, _, guards = nano
    again = Guards.from_json(guards.to_json())
    assert [s.text for s in again.specializations] == [s.text for s in guards.specializations]
    with pytest.raises(ShapeMismatch):
        again.check({"idx": _ids(2, 40)})


def test_dtype_finfo_range_and_int_of_sizes_resolve():
    model = Decides()
    x = torch.randn(3, 8)
    gm, guards = concrete_trace(model, {"x": x})
    torch.testing.assert_close(gm(x), model(x))
    assert guards.constants == {"scale": 1.0}
    assert any("range(x.size(1))" in s.code and s.guard.startswith("Eq(") for s in guards.specializations)
    with pytest.raises(ShapeMismatch, match="input x dim 1 = 6"):
        guards.check({"x": torch.randn(3, 6)})
    guards.check({"x": torch.randn(5, 8)})  # the batch was never decided on


def test_branch_on_values_is_refused_with_the_line():
    with pytest.raises(DataDependent, match=r"`if x.sum\(\) > 0:` decides on tensor values at models_real.py:\d+"):
        concrete_trace(OnValues(), {"x": torch.randn(2, 8)})


def test_a_length_of_one_is_not_silently_assumed_away():
    gm, guards = concrete_trace(ShortPath(), {"x": torch.randn(2, 5, 8)})
    guards.check({"x": torch.randn(1, 7, 8)})
    with pytest.raises(ShapeMismatch, match=r"input x dim 1 = 1: .*`if T == 1:`"):
        guards.check({"x": torch.randn(2, 1, 8)})


def test_a_decision_on_an_example_dim_of_one_is_found_by_the_probe():
    class OnBatch(ShortPath):
        def forward(self, x):
            return self.fc(x) * (2 if x.size(0) == 1 else 1)

    gm, guards = concrete_trace(OnBatch(), {"x": torch.randn(1, 5, 8)})
    with pytest.raises(ShapeMismatch, match="input x dim 0 = 3"):
        guards.check({"x": torch.randn(3, 5, 8)})


def test_training_flag_is_not_baked(nano):
    model, gm, guards = nano
    x = _ids(2, 16)
    assert any(s.kind == "training" and "if self.training:" in s.code for s in guards.specializations)
    gm.train()
    assert not torch.equal(gm(x)[0], gm(x)[0])  # dropout on in training mode
    gm.eval()
    first = gm(x)[0]
    assert torch.equal(first, gm(x)[0])  # off in eval mode, deterministic
    model.eval()
    torch.testing.assert_close(first, model(x)[0])


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return hf_models()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "vit"])
def test_hf_models_trace_with_their_output_types(hf, name, attn):
    model, inputs = hf[name]
    model.config._attn_implementation = attn
    model.eval()
    gm, guards = concrete_trace(model, inputs)
    gm.eval()
    ref, out = model(**inputs), gm(**inputs)
    assert type(out) is type(ref)  # a ModelOutput comes back as one: out.logits works
    torch.testing.assert_close(out.logits, ref.logits)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == list(inputs)


def test_hf_padding_mask_and_other_shapes_are_not_baked(hf):
    model, inputs = hf["bert"]
    model.config._attn_implementation = "sdpa"
    model.eval()
    gm, guards = concrete_trace(model, inputs)
    ids = torch.randint(0, 128, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 5:] = 0
    guards.check({"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(gm(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)


def test_hf_loss_from_labels(hf):
    model, inputs = hf["gpt2"]
    model.eval()
    with_labels = {**inputs, "labels": inputs["input_ids"]}
    gm, _ = concrete_trace(model, with_labels)
    gm.eval()
    torch.testing.assert_close(gm(**with_labels).loss, model(**with_labels).loss)
