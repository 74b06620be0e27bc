"""Width-group analysis on small fx graphs: which dims tie, stack, split, and which stay fixed."""
import torch
from torch import nn

from siftc import solve
from siftc.passes.groups import analyse
from siftc.trace import trace

from models_wide import CatBranches, Chunked, DownsampleResidual, FlattenLinear, NoRule


def _groups(model, widen_heads=False):
    gm = trace(model, model.inputs()).gm
    return gm, analyse(gm, widen_heads)


def test_residual_add_ties_the_shortcut_across_downsampling():
    _, a = _groups(DownsampleResidual())
    assert a.uses["conv2"]["out"] == a.uses["shortcut.0"]["out"] == a.uses["shortcut.1"]["c"]
    assert a.uses["conv1"]["in"] == a.uses["shortcut.0"]["in"] == a.uses["stem"]["out"]
    assert a.uses["conv1"]["out"] != a.uses["conv2"]["out"]  # no add between them


def test_cat_stacks_the_branch_groups_in_order():
    _, a = _groups(CatBranches())
    assert a.uses["mix"]["in"] == a.uses["a"]["out"] + a.uses["b"]["out"]
    assert a.size(a.uses["bn"]["c"]) == 16


def test_chunk_makes_equal_pieces_of_one_group():
    _, a = _groups(Chunked())
    (g, m), = a.uses["down"]["in"]
    assert a.uses["up"]["out"] == ((g, 1), (g, 1)) and m == 1


def test_flatten_multiplies_channels_by_spatial_size():
    _, a = _groups(FlattenLinear())
    (g, m), = a.uses["fc1"]["in"]
    assert ((g, 1),) == a.uses["conv2"]["out"] and m == 16


def test_op_without_rule_fixes_its_groups_and_names_the_op():
    _, a = _groups(NoRule())
    (g, _), = a.uses["b"]["out"]
    assert "cumsum" in a.groups[g].fixed and a.groups[g].no_rule == "cumsum"
    (h, _), = a.uses["c"]["out"]
    assert a.groups[h].fixed is None and a.groups[h].sourced


def test_model_input_and_output_widths_are_fixed():
    _, a = _groups(NoRule())
    for label in (a.uses["a"]["in"], a.uses["d"]["out"]):
        assert all(a.groups[g].fixed in ("model input", "model output") for g, _ in label)


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.qkv, self.proj, self.out = nn.Linear(5, 16), nn.Linear(16, 48), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):                                      # (B, T, 5)
        h = self.inp(x)
        B, T, C = h.size()
        q, k, v = self.qkv(h).split(16, dim=2)                 # 3 x (B, T, 16)
        q, k, v = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in (q, k, v))  # (B, 4, T, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, 16)
        return self.out(h + self.proj(y))

    @staticmethod
    def inputs():
        return (torch.randn(2, 3, 5),)


def test_heads_keep_their_width_unless_asked():
    _, a = _groups(Heads())
    assert all(a.groups[g].fixed and "heads" in a.groups[g].fixed for g, _ in a.uses["qkv"]["out"])
    assert a.groups[a.uses["inp"]["out"][0][0]].fixed is None  # the residual stream widens
    _, a = _groups(Heads(), widen_heads=True)
    pieces = a.uses["qkv"]["out"]
    assert len(pieces) == 3 and all(m == 4 and a.groups[g].fixed is None for g, m in pieces)
    assert a.uses["proj"]["in"] == (pieces[2],)  # v's head_dim x 4 heads


def test_groups_are_stored_on_the_graph():
    gm, a = _groups(DownsampleResidual())
    node = next(n for n in gm.graph.nodes if n.target == "fc")
    assert node.meta["siftc.dims"][1] == a.uses["fc"]["out"]


def test_wide_width_rounding_reproduces_the_papers_gpt3_small():
    assert [solve.wide_width(w, 0.5, 12) for w in (768, 3072)] == [1092, 4344]
    assert [solve.wide_width(w, 0.75, 12) for w in (768, 3072)] == [1536, 6144]
    assert solve.wide_width(37, 0.0, 8) == 37          # s = 0 keeps every width
    assert solve.wide_width(3, 0.1, 8) == 8            # never below the dense width


def test_members_name_the_slice_of_a_pieced_side_and_the_flatten_factor():
    _, a = _groups(CatBranches())
    members = a.members()
    (ga, _), (gb, _) = a.uses["mix"]["in"]
    assert members[ga] == ["a:out", "bn:c[0:6]", "mix:in[0:6]"]
    assert members[gb] == ["b:out", "bn:c[6:16]", "mix:in[6:16]"]
    _, a = _groups(FlattenLinear())
    assert a.members()[a.uses["conv2"]["out"][0][0]] == ["conv2:out", "fc1:in (16x)"]
