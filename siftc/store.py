"""Files on disk, written once each way: atomically, hashed, never over an existing output by accident.

    write_file(path, write)      write(f) fills a temp file beside `path`; fsync, rename, fsync the dir
    place(tmp, path)             the same last steps for a file something else wrote (torch.onnx.export)
    write_dir(out, force, fill)  fill(tmp) fills a temp dir `.<name>.XXXX` beside `out`, renamed into place
    file_sha256(path)            hex digest, read in 1 MB blocks
    check_output(out, force)     refuse an existing output unless --force, before any work is done
    read_sidecar / write_sidecar the `<file>.onnx.json` that says what an exported file is

A kill at any moment leaves either the old file (or directory) or the new one, never half of one.
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from siftc.errors import UsageError

SIDECAR_FORMAT = "siftc-onnx"
SIDECAR_VERSION = 1


def check_output(out: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output unless `force`; called before any work is done."""
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists; choose another -o or pass --force to replace it")
    return out


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path):
    """Flush a file's or a directory's entry to disk (a directory: so a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(tmp: Path, path: Path):
    """Move a finished file `tmp` (in the same directory as `path`) over `path`, durably."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def write_file(path: str | os.PathLike, write) -> Path:
    """Write `path` atomically: `write(f)` fills a binary temp file in the same directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        place(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    return write_file(path, lambda f: f.write(json.dumps(data, indent=1).encode()))


@contextlib.contextmanager
def scratch_dir(beside: Path):
    """A temp dir `.<name>.XXXX` next to `beside` (same file system, so a rename out of it is atomic),
    removed with whatever is left in it."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.", dir=beside.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_dir(out: str | os.PathLike, force: bool, fill) -> Path:
    """Create the directory `out` atomically: `fill(tmp)` writes into a sibling temp dir that is renamed
    into place; an existing `out` is replaced only when `force`."""
    out = check_output(out, force)
    with scratch_dir(out) as scratch:
        tmp, old = scratch / out.name, scratch / "old"
        tmp.mkdir()
        fill(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        if out.exists():
            os.rename(out, old)  # moved aside, not deleted, until the new one is in place
        try:
            os.rename(tmp, out)
        except BaseException:
            if old.exists():
                os.rename(old, out)
            raise
        _fsync(out.parent)
    return out


def sidecar_path(path) -> Path:
    """model.onnx -> model.onnx.json"""
    return Path(str(path) + ".json")


def write_sidecar(path, meta: dict) -> dict:
    """Write the sidecar of the exported file `path` atomically; returns `meta` with the format tag."""
    meta = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, **meta}
    write_json(sidecar_path(path), meta)
    return meta


def read_sidecar(path) -> dict | None:
    """The sidecar of an exported file, or None for an ONNX file siftc did not write."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{side} is corrupt ({e}); export the model again") from e
    return meta if isinstance(meta, dict) and meta.get("format") == SIDECAR_FORMAT else None
