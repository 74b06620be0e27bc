"""Sparse layers hold only their non-zeros (values + positions): nothing dense-shaped is stored, any
optimizer sees nnz-sized parameters, mask updates carry values and optimizer state to their new entries,
and dense-shaped state dicts (older checkpoints, pretrained dense layers) load by packing."""
import math

import pytest
import torch
from torch import nn

import siftc
from siftc import sparse as sp
from siftc.nn import sparse
from siftc.nn.sparse import SPARSE_LAYERS, SparseConv2d, SparseLinear

from conftest import spec_path

MLP = spec_path("examples/mlp.py:mlp")


def stored(module: nn.Module) -> int:
    """Elements a module keeps in its parameters and buffers."""
    return sum(t.numel() for t in module.state_dict().values())


def test_a_huge_sparse_layer_stores_only_its_non_zeros():
    # 1.6e9 dense entries (6.4 GB as fp32, 1.6 GB as a boolean mask): neither is ever made
    layer = SparseLinear(40_000, 40_000, nnz=10_000, generator=torch.Generator().manual_seed(0))
    assert layer.weight_shape == (40_000, 40_000) and layer.nnz == 10_000
    assert stored(layer) == 10_000 + 10_000 + 40_000 + 2 + 5  # values, positions, bias, weight_shape, pattern
    pos = layer.positions.long()
    assert pos.unique().numel() == 10_000 and bool((pos[1:] > pos[:-1]).all())
    assert 0 <= int(pos[0]) and int(pos[-1]) < 40_000 ** 2


@pytest.mark.parametrize("n,k", [(80, 5), (80, 70)])
def test_positions_are_a_uniform_subset(n, k):
    g = torch.Generator().manual_seed(0)
    for draw in (lambda: sparse._draw_distinct(n, k, g), lambda: sparse.random_positions((n,), k, g).long()):
        hits = torch.zeros(n)
        trials = 4000
        for _ in range(trials):
            p = draw()
            assert p.numel() == k and p.unique().numel() == k
            hits[p] += 1
        expect = trials * k / n
        assert (hits - expect).abs().max() < 5 * math.sqrt(expect)  # every position alike


@pytest.mark.parametrize("opt", [
    lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    lambda ps: torch.optim.Adagrad(ps, lr=0.05),
], ids=["sgd-momentum", "adamw", "adagrad"])
def test_any_optimizer_trains_nnz_sized_parameters(opt):
    torch.manual_seed(0)
    gm = siftc.convert(MLP, "wide", 0.9, seed=0)
    optimizer = opt(gm.parameters())
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(gm(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    layers = [m for m in gm.modules() if isinstance(m, SPARSE_LAYERS)]
    assert layers
    for m in layers:
        state = optimizer.state[m.values]
        tensors = [t for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
        assert tensors and all(t.shape == (m.nnz,) for t in tensors)
        assert m.nnz < 0.2 * math.prod(m.weight_shape)


def test_mask_update_carries_values_and_adam_state_to_their_new_entries():
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(20, 30, nnz=150), nn.ReLU(), SparseLinear(30, 5, nnz=60))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = sp.SET(model, opt, total_steps=100, update_every=3)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    for step in range(1, 4):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 3:  # the update step: what each position held just before it
            before = {m: (m.positions.long().clone(), m.values.detach().clone(),
                          {k: opt.state[m.values][k].clone() for k in ("exp_avg", "exp_avg_sq")})
                      for m in (model[0], model[2])}
        record = sched.step()
    assert record is not None and record["step"] == 3
    for name, (m, (old_pos, old_values, old_state)) in zip(("0", "2"), before.items()):
        assert m.nnz == old_pos.numel()  # counts constant
        new_pos = m.positions.long()
        assert not torch.equal(new_pos, old_pos)  # the mask moved
        dropped = old_pos[old_values.abs().topk(record["changed"][name], largest=False).indices]
        src, kept = sparse.match_positions(old_pos, new_pos)
        kept &= ~torch.isin(new_pos, dropped)  # one dropped and regrown at once is regrown
        assert kept.any() and (~kept).any()
        torch.testing.assert_close(m.values[kept], old_values[src[kept]], rtol=0, atol=0)
        assert (m.values[~kept] == 0).all()  # regrown weights start at zero
        for k, t in old_state.items():
            now = opt.state[m.values][k]
            assert now.shape == (m.nnz,)
            torch.testing.assert_close(now[kept], t[src[kept]], rtol=0, atol=0)
            assert (now[~kept] == 0).all()


def test_dense_shaped_state_dicts_are_packed_on_load():
    torch.manual_seed(0)
    layer = SparseConv2d(3, 8, 3, padding=1, nnz=100)
    x = torch.randn(2, 3, 6, 6)
    old_format = {"weight": layer.weight.detach().clone(), "mask": layer.mask, "bias": layer.bias.detach().clone()}
    other = SparseConv2d(3, 8, 3, padding=1, nnz=50)  # another count and other positions
    other.load_state_dict(old_format)
    assert other.nnz == 100 and torch.equal(other.positions, layer.positions)
    siftc.set_backend(other, "torch"), siftc.set_backend(layer, "torch")  # exact: one backend on both sides
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    # a dense layer's weights load at the sparse layer's own positions
    dense = nn.Conv2d(3, 8, 3, padding=1)
    layer.load_state_dict(dense.state_dict())
    assert torch.equal(layer.weight, dense.weight.detach() * layer.mask)
    # a state dict of another dense shape is refused by name
    with pytest.raises(RuntimeError, match="dense shape"):
        SparseConv2d(3, 4, 3, nnz=10).load_state_dict(layer.state_dict())


def test_writing_through_set_weight_and_set_positions():
    layer = SparseLinear(6, 4, bias=False, nnz=10)
    dense = torch.arange(24.0).view(4, 6)
    layer.set_weight(dense)
    assert torch.equal(layer.weight, dense * layer.mask)
    values = layer.values
    src, kept = layer.set_positions(torch.arange(10))  # same count: the Parameter object is kept
    assert layer.values is values and torch.equal(layer.positions, torch.arange(10, dtype=torch.int32))
    assert torch.equal(layer.values[kept], dense.view(-1)[:10][kept]) and (layer.values[~kept] == 0).all()
    layer.set_positions(torch.arange(0, 24, 2))  # another count: a new Parameter of that size
    assert layer.nnz == 12 and layer.values is not values and layer.values.requires_grad
