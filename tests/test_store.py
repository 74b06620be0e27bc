"""siftc.store: writes are all-or-nothing (a failure leaves the old file or directory and no temp
files), outputs are not replaced without force, hashes are sha256, the sidecar round-trips."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from siftc import store
from siftc.errors import ArtifactError, UsageError


def test_write_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "ckpt.pt"
    store.write_file(path, lambda f: f.write(b"old"))

    def half(f):
        f.write(b"half of the new")
        raise OSError("disk full (test)")

    with pytest.raises(UsageError, match=r"cannot write .*ckpt.pt: disk full \(test\)"):
        store.write_file(path, half)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    store.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}


def test_write_dir_refuses_replaces_and_survives_a_failed_fill(tmp_path):
    out, art = tmp_path / "art", "siftc-artifact"

    def fill(text):
        return lambda d: [(d / "siftc.json").write_text('{"format": "siftc-artifact"}'), (d / "a.txt").write_text(text)]

    store.write_dir(out, False, fill("one"), want=art)
    with pytest.raises(UsageError, match=r"output .*art already exists; choose another -o or pass --force"):
        store.write_dir(out, False, fill("two"), want=art)

    def fails(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("fill failed (test)")

    with pytest.raises(RuntimeError, match="fill failed"):
        store.write_dir(out, True, fails, want=art)
    assert (out / "a.txt").read_text() == "one" and [p.name for p in tmp_path.iterdir()] == ["art"]
    store.write_dir(out, True, lambda d: (d / "b.txt").write_text("two"), want=art)
    assert [p.name for p in out.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["art"]


def test_check_output(tmp_path):
    art = "siftc-artifact"
    assert store.check_output(tmp_path / "new", False) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert store.check_output(tmp_path / "empty", True, want=art) == tmp_path / "empty"
    with pytest.raises(UsageError, match="already exists; choose another -o or pass --force to replace it"):
        store.check_output(tmp_path / "empty", False, want=art)
    with pytest.raises(UsageError, match="is a directory and this command writes a file"):
        store.check_output(tmp_path / "empty", True)


def test_force_replaces_only_what_siftc_wrote(tmp_path, monkeypatch):
    art, run = "siftc-artifact", "siftc-run"
    store.write_dir(tmp_path / "a", False, lambda d: (d / "siftc.json").write_text('{"format": "siftc-artifact"}'),
                    want=art)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.json").write_text('{"format": "siftc-run"}')
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    (tmp_path / "results.json").write_text("{}")
    store.write_json(tmp_path / "bench.json", {"format": "siftc-bench"})
    monkeypatch.chdir(tmp_path / "a")
    refused = {
        tmp_path / "a": (art, (), "current directory or holds it"),
        tmp_path: (art, (), "holds it"),
        tmp_path / "mine": (art, (), "directory siftc did not write"),
        tmp_path / "r": (art, (), "is a siftc training run and this command writes a siftc artifact"),
        tmp_path / "link": (art, (), "symbolic link"),
        tmp_path / "results.json": ("siftc-bench", (), "file siftc did not write"),
        tmp_path / "bench.json": ("siftc-bench", (tmp_path / "bench.json",), "this command's input"),
    }
    for out, (want, inputs, needle) in refused.items():
        with pytest.raises(UsageError, match=needle):
            store.check_output(out, True, want=want, inputs=inputs)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="holds it"):
        store.check_output(tmp_path / "r", True, want=run, inputs=(tmp_path / "r" / "data.npz",))
    assert store.check_output(tmp_path / "r", True, want=run) == tmp_path / "r"
    assert store.check_output(tmp_path / "bench.json", True, want="siftc-bench") == tmp_path / "bench.json"
    with pytest.raises(UsageError, match=r"cannot write .*results.json/x: .*results.json is a file"):
        store.check_output(tmp_path / "results.json" / "x", False)


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path):
    out = tmp_path / "art"
    stale_dir, stale_file, fresh = tmp_path / ".art.abcd1234", tmp_path / ".art.zzzz0000", tmp_path / ".art.young123"
    stale_dir.mkdir()
    (stale_dir / "weights.pt").write_bytes(b"half")
    stale_file.write_bytes(b"half")
    fresh.mkdir()
    for p in (stale_dir, stale_file):
        os.utime(p, (1, 1))
    store.write_dir(out, False, lambda d: (d / "a").write_text("x"), want="siftc-artifact")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.young123", "art"]


def test_killed_between_renames_keeps_the_old_directory(tmp_path):
    scratch = tmp_path / ".art.abcd1234"
    (scratch / "old").mkdir(parents=True)
    (scratch / "old" / "siftc.json").write_text("old")
    os.utime(scratch, (1, 1))
    store.clean_stale(tmp_path / "art")
    assert (tmp_path / "art" / "siftc.json").read_text() == "old" and not scratch.exists()


def test_run_lock_refuses_a_second_writer(tmp_path):
    with store.run_lock(tmp_path):
        child = subprocess.run([sys.executable, "-c", "import sys; from siftc import store\n"
                                "with store.run_lock(sys.argv[1]): pass", str(tmp_path)],
                               capture_output=True, text=True)
        assert f"being written by another siftc process (pid {os.getpid()})" in child.stderr
    with store.run_lock(tmp_path):  # released
        pass


def test_file_sha256_reads_in_blocks(tmp_path):
    data = bytes(range(256)) * 9000  # over two 1 MB blocks
    (tmp_path / "f").write_bytes(data)
    assert store.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_verify_digest_raises_the_callers_error(tmp_path):
    f = tmp_path / "w.pt"
    f.write_bytes(b"weights")
    ok = hashlib.sha256(b"weights").hexdigest()
    store.verify_digest(f, ok, missing="gone", changed="changed")  # the same bytes: no error
    with pytest.raises(ArtifactError, match="^changed$"):
        store.verify_digest(f, "0" * 64, missing="gone", changed="changed", error=ArtifactError)
    with pytest.raises(UsageError, match="^gone$"):
        store.verify_digest(tmp_path / "nope", ok, missing="gone", changed="changed")
    (tmp_path / "d").mkdir()
    with pytest.raises(UsageError, match="^gone$"):  # a directory is not the file that was hashed
        store.verify_digest(tmp_path / "d", ok, missing="gone", changed="changed")
    store.verify_digest(tmp_path / "d", "dir", missing="gone", changed="changed", present=os.path.exists,
                        digest_of=lambda p: "dir")
    f.chmod(0)
    if os.geteuid() != 0:  # root reads it anyway
        with pytest.raises(UsageError, match=r"cannot read .*w.pt: Permission denied"):
            store.verify_digest(f, ok, missing="gone", changed="changed")


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
