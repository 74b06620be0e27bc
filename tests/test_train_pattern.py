"""siftc train on an artifact converted with --pattern (issue 13): RigL on the native backend keeps every
layer's pattern, structure and count through training, its checkpoint and a resume, and the trained
model's artifact loads with the patterns."""
import json

import numpy as np
import siftc
from siftc.artifact import read_state
from siftc.sparse import check_structure, sparse_layers
from siftc.train import TrainConfig, train
from test_train import CLASSIFIER, cli, one_thread  # noqa: F401 (fixture: 1 thread)

ARGS = dict(method="rigl", batch_size=16, update_every=5, seed=4, backend="native", checkpoint_every=10,
            log_every=5, eval_every=10)


def test_rigl_on_native_keeps_the_patterns_through_a_checkpoint_and_resume(tmp_path):
    (tmp_path / "clf.py").write_text(CLASSIFIER)
    gm = siftc.convert(str(tmp_path / "clf.py"), "parallel", 0.75, pattern="block:4x1")
    siftc.save(gm, tmp_path / "clf")
    start = {n: (m.nnz, m.positions.clone()) for n, m in sparse_layers(gm).items()}
    g = np.random.default_rng(0)
    x = g.normal(size=(300, 64)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=x[:, :10].argmax(1).astype(np.int64))
    run = tmp_path / "run"
    train(TrainConfig(str(tmp_path / "clf"), str(tmp_path / "data.npz"), str(run), steps=20, **ARGS))
    r = cli("train", "--resume", run, "--steps", 40, "--quiet")
    assert r.exit_code == 0, r.output
    updates = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
               if "mask_update" in json.loads(line)]
    assert updates and max(updates) > 20  # masks moved after the resume too
    trained = siftc.load(run / "model")
    moved = 0
    for name, m in sparse_layers(trained).items():
        assert str(m.pattern) == "block:4x1", name
        assert check_structure(m.positions, m.weight_shape, m.pattern) is None, name
        assert m.nnz == start[name][0]
        moved += int((m.positions != start[name][1]).sum())
    assert moved > 0
    state = read_state(run / "model")
    assert all(state[f"{n}.pattern"].tolist() == [4, 1, 0, 0, 0] for n in start)
