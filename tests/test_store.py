"""siftc.store: writes are all-or-nothing (a failure leaves the old file or directory and no temp
files), outputs are not replaced without force, hashes are sha256, the sidecar round-trips."""
import hashlib
import json

import pytest

from siftc import store
from siftc.errors import UsageError


def test_write_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "ckpt.pt"
    store.write_file(path, lambda f: f.write(b"old"))

    def half(f):
        f.write(b"half of the new")
        raise OSError("disk full (test)")

    with pytest.raises(OSError, match="disk full"):
        store.write_file(path, half)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    store.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}


def test_write_dir_refuses_replaces_and_survives_a_failed_fill(tmp_path):
    out = tmp_path / "art"
    store.write_dir(out, False, lambda d: (d / "a.txt").write_text("one"))
    with pytest.raises(UsageError, match=r"output .*art already exists; choose another -o or pass --force"):
        store.write_dir(out, False, lambda d: (d / "a.txt").write_text("two"))

    def fails(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("fill failed (test)")

    with pytest.raises(RuntimeError, match="fill failed"):
        store.write_dir(out, True, fails)
    assert (out / "a.txt").read_text() == "one" and [p.name for p in tmp_path.iterdir()] == ["art"]
    store.write_dir(out, True, lambda d: (d / "b.txt").write_text("two"))
    assert [p.name for p in out.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["art"]


def test_check_output(tmp_path):
    assert store.check_output(tmp_path / "new", False) == tmp_path / "new"
    assert store.check_output(tmp_path, True) == tmp_path
    with pytest.raises(UsageError, match="already exists; choose another -o or pass --force to replace it"):
        store.check_output(tmp_path, False)


def test_file_sha256_reads_in_blocks(tmp_path):
    data = bytes(range(256)) * 9000  # over two 1 MB blocks
    (tmp_path / "f").write_bytes(data)
    assert store.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_sidecar_round_trip_and_foreign_files(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    assert store.sidecar_path(onnx_path) == tmp_path / "m.onnx.json"
    assert store.read_sidecar(onnx_path) is None  # no sidecar: a file siftc did not write
    meta = store.write_sidecar(onnx_path, {"kind": "wide"})
    assert meta == {"format": store.SIDECAR_FORMAT, "version": store.SIDECAR_VERSION, "kind": "wide"}
    assert store.read_sidecar(onnx_path) == meta
    store.sidecar_path(onnx_path).write_text('{"format": "other"}')
    assert store.read_sidecar(onnx_path) is None
    store.sidecar_path(onnx_path).write_text('{"format": ')
    with pytest.raises(UsageError, match=r"m.onnx.json is corrupt .*; export the model again"):
        store.read_sidecar(onnx_path)
