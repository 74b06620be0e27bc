"""Static / SET / RigL mask schedulers: counts, zeros, where they grow, the schedule."""
import math

import pytest
import torch
from scipy.stats import chisquare
from torch import nn

import siftc.sparse as sp
from siftc.errors import UsageError
from siftc.nn.sparse import SparseConv2d, SparseLinear


def tiny(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return nn.Sequential(SparseLinear(12, 24, nnz=100, generator=g), nn.ReLU(),
                         SparseLinear(24, 5, nnz=40, generator=g))


def train_steps(model, opt, sched, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(steps):
        x = torch.randn(16, 12, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        records.append(sched.step())
    return records


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_nnz_constant_and_pruned_weights_stay_zero(method):
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    sched = sp.METHODS[method](model, opt, total_steps=60, update_every=5)
    layers = sp.sparse_layers(model)
    counts = {n: l.nnz for n, l in layers.items()}
    g = torch.Generator().manual_seed(1)
    updates = 0
    for _ in range(60):
        before = {n: l.weight.detach().clone() for n, l in layers.items()}
        masks = {n: l.mask.clone() for n, l in layers.items()}
        loss = model(torch.randn(16, 12, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        updates += sched.step() is not None
        for n, layer in layers.items():
            assert layer.nnz == counts[n]
            assert torch.all(layer.weight[~layer.mask] == 0)
            # a weight pruned before this step and still pruned after was not updated
            still_pruned = ~masks[n] & ~layer.mask
            assert torch.equal(layer.weight[still_pruned], before[n][still_pruned])
    assert updates == len(sched.update_steps()) == 8  # 5, 10, ..., 40 (< 45 = 75% of 60)


def test_rigl_grows_where_crafted_gradient_is_largest():
    torch.manual_seed(0)
    layer = SparseLinear(8, 6, bias=False, nnz=12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # distinct magnitudes, so the drop set is unique
        layer.set_weight(torch.arange(1, 49, dtype=torch.float).view(6, 8) / 10)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)  # weights stay put; only the mask moves
    sched = sp.RigL(layer, opt, total_steps=1000, update_every=1, end_fraction=1.0)
    k = round(sched.drop_fraction_at(1) * 12)
    G = torch.randn(8, 6, generator=torch.Generator().manual_seed(7))  # dL/dY for x = I: dL/dW = G^T
    (layer(torch.eye(8)) * G).sum().backward()
    old = layer.mask.clone()
    opt.step()
    record = sched.step()
    assert record["changed"] == {"": k} and k > 0

    active = torch.nonzero(old.view(-1)).view(-1)
    magnitude = layer.weight.detach().new_tensor((torch.arange(1, 49) / 10).tolist())[active]
    dropped = active[magnitude.argsort()[:k]]
    kept = old.view(-1).clone()
    kept[dropped] = False
    score = G.t().abs().reshape(-1).masked_fill(kept, -1)
    grown = score.argsort(descending=True)[:k]
    expected = kept.clone()
    expected[grown] = True
    assert torch.equal(layer.mask.view(-1), expected)
    assert layer.nnz == 12
    assert torch.all(layer.weight.view(-1)[grown] == 0)  # regrown weights start at zero


def test_set_grows_uniformly_at_random():
    base = SparseLinear(10, 10, bias=False, nnz=50, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base.set_weight(torch.linspace(1, 2, 100).view(10, 10))
    counts = torch.zeros(100)
    trials, k = 400, None
    for trial in range(trials):
        layer = SparseLinear(10, 10, bias=False, nnz=50)
        layer.load_state_dict(base.state_dict())
        sched = sp.SET(layer, None, total_steps=1000, update_every=1, end_fraction=1.0, seed=trial)
        k = round(sched.drop_fraction_at(1) * 50)
        kept_before = layer.mask.clone()
        sched.step()
        counts += (layer.mask & ~kept_before).view(-1).float()  # grown at a new position
    # Candidates are the 50 inactive positions plus the k dropped ones; a draw that lands on a dropped
    # one regrows it in place. Test the 50 always-inactive positions: each equally likely.
    inactive = ~base.mask.view(-1)
    observed = counts[inactive]
    p = chisquare(observed.numpy()).pvalue
    assert p > 1e-3
    expected_each = trials * k / (50 + k)
    assert abs(observed.mean().item() - expected_each) < 0.1 * expected_each


def test_drop_fraction_schedule_is_cosine_and_stops_at_75_percent():
    model = tiny()
    sched = sp.RigL(model, None, total_steps=1000)
    assert (sched.update_every, sched.drop_fraction, sched.end_fraction) == (100, 0.3, 0.75)
    for t in (0, 100, 250, 500, 700, 749):
        assert sched.drop_fraction_at(t) == pytest.approx(0.15 * (1 + math.cos(math.pi * t / 750)))
    assert sched.drop_fraction_at(750) == 0 and sched.drop_fraction_at(900) == 0
    assert sched.update_steps() == [100, 200, 300, 400, 500, 600, 700]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = sp.RigL(model, opt, total_steps=40, update_every=4)
    records = train_steps(model, opt, sched, 40)
    assert [r["step"] for r in records if r] == [4, 8, 12, 16, 20, 24, 28]  # stop before step 30
    assert all(r["drop_fraction"] == pytest.approx(0.15 * (1 + math.cos(math.pi * r["step"] / 30)))
               for r in records if r)


def test_static_never_changes():
    model = tiny()
    masks = [l.mask.clone() for l in sp.sparse_layers(model).values()]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = sp.Static(model, opt, total_steps=30, update_every=2)
    assert train_steps(model, opt, sched, 30) == [None] * 30
    assert all(torch.equal(a, l.mask) for a, l in zip(masks, sp.sparse_layers(model).values()))
    assert sched.update_steps() == []


def test_dense_gradient_only_on_update_steps_and_correct():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = sp.RigL(model, opt, total_steps=100, update_every=3)
    seen = []
    orig = sp.RigL._grow_scores

    def spy(self):
        scores = orig(self)
        seen.append(self.t)
        return scores
    sp.RigL._grow_scores = spy
    try:
        train_steps(model, opt, sched, 10)
    finally:
        sp.RigL._grow_scores = orig
    assert seen == [3, 6, 9] and sched.dense_grad_steps == 3
    # dense_weight_grad equals autograd's gradient of the unmasked layer
    for dense in (nn.Linear(5, 4), nn.Conv2d(3, 4, 3, stride=2, padding=1)):
        x = torch.randn(2, 5) if isinstance(dense, nn.Linear) else torch.randn(2, 3, 7, 7)
        y = dense(x)
        g = torch.randn_like(y)
        y.backward(g)
        assert torch.allclose(sp.dense_weight_grad(dense, x, g), dense.weight.grad, atol=1e-5)


def test_regrown_weights_and_adam_state_start_at_zero():
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = sp.RigL(model, opt, total_steps=100, update_every=5)
    layers = list(sp.sparse_layers(model).values())
    train_steps(model, opt, sched, 4)
    masks = [l.mask.clone() for l in layers]
    train_steps(model, opt, sched, 1, seed=5)  # step 5: an update
    for old, layer in zip(masks, layers):
        grown = layer.mask & ~old
        assert grown.any()
        assert torch.all(layer.weight[grown] == 0)
        grown_entries = grown.reshape(-1)[layer.positions.long()]
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[layer.values][key]
            assert state.shape == (layer.nnz,)  # the moments are as small as the values
            assert torch.all(state[grown_entries] == 0)
            assert state[~grown_entries].count_nonzero() > 0  # kept entries keep theirs


def test_conv_layers_and_state_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(SparseConv2d(3, 8, 3, nnz=100), nn.ReLU(), nn.Flatten(),
                          SparseLinear(8 * 6 * 6, 4, nnz=200))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = sp.SET(model, opt, total_steps=20, update_every=2, seed=4)
    for _ in range(3):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        sched.step()
    again = sp.SET(model, opt, total_steps=20, update_every=2, seed=99)
    again.load_state_dict(sched.state_dict())
    assert again.t == 3 and torch.equal(again.generator.get_state(), sched.generator.get_state())
    with pytest.raises(UsageError):
        sp.RigL(model, opt, total_steps=20).load_state_dict(sched.state_dict())
    assert [l.nnz for l in sp.sparse_layers(model).values()] == [100, 200]


@pytest.mark.parametrize("kwargs", [dict(total_steps=0), dict(total_steps=10, update_every=0),
                                    dict(total_steps=10, drop_fraction=1.5),
                                    dict(total_steps=10, end_fraction=-0.1)])
def test_bad_scheduler_arguments(kwargs):
    with pytest.raises(UsageError):
        sp.RigL(tiny(), None, **kwargs)


# ---- structured masks: layer.pattern ------------------------------------------------------------
from siftc.sparse.patterns import Pattern, Tiling, check_structure  # noqa: E402
from siftc.sparse.structured import random_positions  # noqa: E402

STRUCTURED = ["block:4x1", "block:16x1", "block:1x4", "block:4x4", "nm:2:4", "nm:4:8:t"]


def structured_net(text, seed=0):
    """A conv and a linear layer carrying `text`'s pattern, at ~30% density in whole blocks."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(SparseConv2d(8, 16, 3, padding=1, generator=g), nn.ReLU(), nn.Flatten(),
                          SparseLinear(16 * 4 * 4, 16, generator=g))
    pattern = Pattern.parse(text)
    for layer in sp.sparse_layers(model).values():
        layer.pattern = pattern
        shape = layer.weight_shape
        nnz = pattern.fixed_nnz(shape) or round(0.3 * math.prod(shape) / pattern.unit) * pattern.unit
        layer.set_positions(random_positions(shape, pattern, nnz, g))
        layer.reset_parameters()
    return model


def assert_structured(layer):
    assert check_structure(layer.positions, layer.weight_shape, layer.pattern) is None
    if layer.pattern.transposable:  # the transposed weight, (in, out) at each kernel position, is N:M too
        flipped = layer.mask.transpose(0, 1).reshape(-1).nonzero().squeeze(1)
        shape_t = (layer.weight_shape[1], layer.weight_shape[0], *layer.weight_shape[2:])
        assert check_structure(flipped, shape_t, Pattern.nm(layer.pattern.n, layer.pattern.m)) is None


@pytest.mark.parametrize("text", STRUCTURED)
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_structured_masks_keep_their_structure_through_updates(method, text):
    model = structured_net(text)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = sp.METHODS[method](model, opt, total_steps=40, update_every=3, drop_fraction=0.5)
    layers = sp.sparse_layers(model)
    counts = {n: l.nnz for n, l in layers.items()}
    g = torch.Generator().manual_seed(1)
    moved, changed = 0, dict.fromkeys(layers, 0)
    for _ in range(40):
        masks = {n: l.mask.clone() for n, l in layers.items()}
        loss = model(torch.randn(4, 8, 4, 4, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        record = sched.step()
        for n, layer in layers.items():
            assert_structured(layer)
            assert layer.nnz == counts[n]
            grown = (layer.mask & ~masks[n]).reshape(-1)[layer.positions.long()]
            assert torch.all(layer.values[grown] == 0)
            for state in ("exp_avg", "exp_avg_sq"):
                assert torch.all(opt.state[layer.values][state][grown] == 0)
            moved += int(grown.sum())
        if record:  # what moved: whole blocks (a count under half a block rounds to none)
            for n, k in record["changed"].items():
                assert k % layers[n].pattern.unit == 0
                changed[n] += k
    assert sched.updates == len(sched.update_steps()) == 9
    # changed also counts blocks dropped and regrown in place (which restart at zero too)
    assert all(k > 0 for k in changed.values()) and 0 < moved <= sum(changed.values())


def crafted_linear(text, nnz, seed=3):
    """A bias-free 8 -> 16 SparseLinear with `text`'s pattern and every weight's magnitude distinct."""
    pattern = Pattern.parse(text)
    layer = SparseLinear(8, 16, bias=False, generator=torch.Generator().manual_seed(seed))
    layer.pattern = pattern
    layer.set_positions(random_positions((16, 8), pattern, nnz, torch.Generator().manual_seed(seed)))
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(seed)).float()
    with torch.no_grad():
        layer.set_weight(((perm + 1) / 100).view(16, 8))
    return layer


def rigl_update(layer, seed=7):
    """One RigL update of `layer` at lr 0 for x = I, so dL/dW = G^T for the returned G."""
    opt = torch.optim.AdamW(layer.parameters(), lr=0.0, weight_decay=0.0)
    sched = sp.RigL(layer, opt, total_steps=1000, update_every=1, end_fraction=1.0)
    G = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))
    (layer(torch.eye(8)) * G).sum().backward()
    opt.step()
    return sched, G.t(), sched.drop_fraction_at(1)


def test_structured_rigl_drops_smallest_blocks_and_grows_largest_gradient_blocks():
    layer = crafted_linear("block:4x1", nnz=48)        # 12 of the 32 blocks of 4 rows x 1 input
    tiling = Tiling((16, 8), layer.pattern)
    old = layer.mask.clone()
    norms = tiling.tiles_of(layer.weight.detach().abs()).sum((1, 2))   # (32,) block L1 norms
    active = tiling.tiles_of(old).all(2).all(1)
    sched, dW, frac = rigl_update(layer)
    k = round(round(frac * 48) / 4)
    record = sched.step()
    assert k > 0 and record["changed"] == {"": 4 * k}
    dropped = active.nonzero().squeeze(1)[norms[active].argsort()[:k]]   # the k smallest active blocks
    kept = active.clone()
    kept[dropped] = False
    grad_norms = tiling.tiles_of(dW.abs()).sum((1, 2)).masked_fill(kept, -1)
    expected = kept.clone()
    expected[grad_norms.argsort(descending=True)[:k]] = True
    assert torch.equal(tiling.tiles_of(layer.mask).all(2).all(1), expected)
    assert_structured(layer)
    assert layer.nnz == 48


def test_structured_rigl_keeps_n_per_group_growing_the_largest_gradients_in_each():
    layer = crafted_linear("nm:2:4", nnz=64)
    tiling = Tiling((16, 8), layer.pattern)
    old = layer.mask.clone()
    sched, dW, frac = rigl_update(layer)
    k = round(frac * 64)
    magnitude = layer.weight.detach().abs().masked_fill(~old, math.inf).reshape(-1)
    kept = old.reshape(-1).clone()
    kept[magnitude.argsort()[:k]] = False                        # the k smallest weights anywhere
    kept = tiling.tiles_of(kept)
    need = 2 - kept.sum(-1)                                      # (32, 1) lost by each group
    score = tiling.tiles_of(dW.abs()).masked_fill(kept, -1)
    rank = score.argsort(-1, descending=True).argsort(-1)
    expected = kept | (rank < need[..., None])
    sched.step()
    assert torch.equal(tiling.tiles_of(layer.mask), expected)
    assert need.sum() == k > 0 and layer.nnz == 64
    assert_structured(layer)


def test_structured_set_grows_random_empty_blocks():
    pattern = Pattern.parse("block:4x1")
    base = crafted_linear("block:4x1", nnz=48)
    tiling = Tiling((16, 8), pattern)
    always_empty = ~tiling.tiles_of(base.mask).all(2).all(1)
    counts = torch.zeros(32)
    for trial in range(150):
        layer = crafted_linear("block:4x1", nnz=48)
        sched = sp.SET(layer, None, total_steps=1000, update_every=1, end_fraction=1.0, seed=trial)
        before = tiling.tiles_of(layer.mask).all(2).all(1)
        sched.step()
        after = tiling.tiles_of(layer.mask).all(2).all(1)
        counts += (after & ~before).float()
        assert_structured(layer)
    observed = counts[always_empty]
    assert observed.sum() > 0
    assert chisquare(observed.numpy()).pvalue > 1e-3  # each empty block equally likely
