"""Files on disk, written once each way: atomically, hashed, never over anything siftc did not write.

    check_output(out, force, ...)  before any work: refuse an existing output unless --force, and even
                                   then anything that is not a siftc output of the same kind, a link, the
                                   working directory or its parents, or the command's own inputs
    write_file(path, write)        write(f) fills a temp file beside `path`; fsync, rename, fsync the dir
    place(tmp, path)               the same last steps for a file something else wrote (torch.onnx.export)
    write_dir(out, force, fill, want=)  fill(tmp) fills a temp dir `.<name>.XXXX` beside `out`, renamed into place
    run_lock(dir)                  an fcntl lock held while one process writes a run directory
    os_errors(path, action)        an OSError inside becomes the one-line error naming the path and the fix
    file_sha256(path)              hex digest, read in 1 MB blocks
    verify_digest(path, digest, ...)  the file is there and hashes to what was recorded, or the caller's error
    read_sidecar / write_sidecar   the `<file>.onnx.json` that says what an exported file is

A kill at any moment leaves either the old file (or directory) or the new one, never half of one. The
temp files and dirs a SIGKILL leaves are locked while in use, so the next write beside them removes them.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from siftc.errors import UsageError

SIDECAR_FORMAT = "siftc-onnx"
SIDECAR_VERSION = 1
PLOT_TAG = "siftc-plot"  # written into a plot's metadata, so --force knows the file is siftc's
PLOTS = {".png": "Software", ".svg": "Creator", ".pdf": "Creator"}  # suffix -> matplotlib metadata key
# What an existing output is, by its format tag; a directory tells by the file that carries its tag.
KINDS = {"siftc-artifact": "a siftc artifact", "siftc-run": "a siftc training run",
         SIDECAR_FORMAT: "a siftc ONNX export", "siftc-bench": "siftc bench results", PLOT_TAG: "a siftc plot"}
TAG_FILES = ("siftc.json", "run.json")
DIR_KINDS = ("siftc-artifact", "siftc-run")  # the outputs that are directories
LOCK = ".siftc.lock"
STALE_S = 10  # a temp file or dir older than this and not locked was left by a killed process
_TEMP = re.compile(r"[a-z0-9_]{8}")  # tempfile's random suffix
_FIXES = {errno.ENOSPC: "free some space on that disk or write elsewhere",
          errno.EDQUOT: "free some of your disk quota or write elsewhere",
          errno.EROFS: "the file system is read-only: write elsewhere",
          errno.EACCES: "no permission: write elsewhere or fix the permissions",
          errno.EPERM: "not permitted: write elsewhere or fix the permissions",
          errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
          errno.EISDIR: "it is a directory: name a file",
          errno.ENOENT: "check the path"}


def os_error(e: OSError, path, action: str = "write") -> UsageError:
    """The one-line error for an OSError at `path`: what failed, why, and the fix."""
    why = e.strerror or str(e)
    fix = _FIXES.get(e.errno, "check the path and the disk")
    return UsageError(f"cannot {action} {path}: {why}; {fix}")


@contextlib.contextmanager
def os_errors(path, action: str = "write"):
    try:
        yield
    except OSError as e:
        raise os_error(e, path, action) from e


def output_kind(path: Path) -> str | None:
    """The format tag of an existing siftc output (see KINDS), or None for anything siftc did not write."""
    try:
        if path.is_dir():
            tags = [path / f for f in TAG_FILES if (path / f).is_file()]
            return _json_tag(tags[0]) if tags else None
        if path.suffix == ".json":
            return _json_tag(path)
        if read_sidecar(path) is not None:
            return SIDECAR_FORMAT
        if path.suffix.lower() in PLOTS:  # a plot: small, with its tag in the metadata
            with open(path, "rb") as f:
                return PLOT_TAG if PLOT_TAG.encode() in f.read(32 << 20) else None
        return None
    except (OSError, UsageError):
        return None


def _json_tag(path: Path) -> str | None:
    try:
        tag = json.loads(path.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return tag if isinstance(tag, str) and tag.startswith("siftc-") else None


def check_parent(out: Path):
    """`out` can be created: its nearest existing ancestor is a writable directory."""
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"cannot write {out}: {anc} is a file, not a directory; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {out}: {anc} is not writable (read-only or no permission); "
                         f"write elsewhere or fix its permissions")


def check_output(out: str | os.PathLike, force: bool, want: str | None = None, inputs=()) -> Path:
    """Refuse `out` before any work is done if it cannot be written, or exists and may not be replaced.

    `--force` replaces only a siftc output of the kind `want` (a KINDS tag; None: any siftc file, not
    a directory), never a symbolic link, the working directory or one holding it, or one of the
    command's `inputs` (or a directory holding one)."""
    out = Path(out)
    check_parent(out)
    if not os.path.lexists(out):
        return out
    if out.is_dir() != (want in DIR_KINDS) and not out.is_symlink():
        raise UsageError(f"output {out} is a {'directory' if out.is_dir() else 'file'} and this command writes "
                         f"{KINDS.get(want, 'a file')}; choose another -o")
    if not force:
        raise UsageError(f"output {out} already exists; choose another -o or pass --force to replace it")
    if out.is_symlink():
        raise UsageError(f"output {out} is a symbolic link to {os.readlink(out)}; siftc does not replace "
                         f"links: pass the real path or remove the link")
    real, cwd = out.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise UsageError(f"refusing to replace {out}: it is the current directory or holds it; "
                         f"choose another -o")
    for p in inputs:
        if p is not None and (real == Path(p).resolve() or real in Path(p).resolve().parents):
            raise UsageError(f"refusing to replace {out}: it is this command's input {p}"
                             f"{'' if real == Path(p).resolve() else ' or holds it'}; choose another -o")
    kind = output_kind(out)
    empty_dir = out.is_dir() and not any(out.iterdir())
    if kind is None and not empty_dir:
        what = "directory" if out.is_dir() else "file"
        raise UsageError(f"refusing to replace {out}: it is a {what} siftc did not write; choose another "
                         f"-o or remove it yourself")
    if kind is not None and want and kind != want:
        writes = KINDS.get(want, "a file")
        raise UsageError(f"refusing to replace {out}: it is {KINDS.get(kind, kind)} and this command writes "
                         f"{writes}; choose another -o")
    return out


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_digest(path, digest: str, *, missing: str, changed: str, error=UsageError, digest_of=None,
                  present=Path.is_file):
    """Raise `error(missing)` unless `present(path)`, and `error(changed)` unless `digest_of(path)`
    (file_sha256 by default) is the recorded `digest`; an OSError while hashing is the one-line read
    error naming the path."""
    path = Path(path)
    if not present(path):
        raise error(missing)
    with os_errors(path, "read"):
        same = (digest_of or file_sha256)(path) == digest
    if not same:
        raise error(changed)


def _fsync(path: Path):
    """Flush a file's or a directory's entry to disk (a directory: so a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(tmp: Path, path: Path):
    """Move a finished file `tmp` (in the same directory as `path`) over `path`, durably."""
    with os_errors(path):
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)


def write_file(path: str | os.PathLike, write) -> Path:
    """Write `path` atomically: `write(f)` fills a binary temp file in the same directory."""
    path = Path(path)
    clean_stale(path)
    with os_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # in use: clean_stale leaves it alone
        with os_errors(path), os.fdopen(fd, "wb") as f:
            write(f)
        place(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    return write_file(path, lambda f: f.write(json.dumps(data, indent=1).encode()))


def clean_stale(beside: Path):
    """Remove the temp files and dirs `.<name>.XXXXXXXX` next to `beside` that a killed process left:
    older than STALE_S and locked by no one."""
    prefix = f".{beside.name}."
    try:
        names = [n for n in os.listdir(beside.parent) if n.startswith(prefix) and _TEMP.fullmatch(n[len(prefix):])]
    except OSError:
        return
    for name in names:
        p = beside.parent / name
        try:
            if time.time() - p.lstat().st_mtime < STALE_S or p.is_symlink():
                continue
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if (p / "old").exists() and not os.path.lexists(beside):
                os.rename(p / "old", beside)  # killed between write_dir's two renames: keep the old one
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        except OSError:
            pass  # locked: a live siftc is writing it
        finally:
            os.close(fd)


def _disk_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


@contextlib.contextmanager
def scratch_dir(beside: Path):
    """A temp dir `.<name>.XXXX` next to `beside` (same file system, so a rename out of it is atomic),
    locked while in use and removed with whatever is left in it. A failure inside it on a full disk is
    reported as the full disk, whatever the writer made of it."""
    with os_errors(beside):
        beside.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(beside)
        tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.", dir=beside.parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    except Exception as e:
        if _disk_full(beside.parent) and not isinstance(e, OSError):
            raise os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), beside) from e
        if isinstance(e, OSError):
            raise os_error(e, e.filename or beside) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def write_dir(out: str | os.PathLike, force: bool, fill, *, want: str, inputs=()) -> Path:
    """Create the directory `out` atomically: `fill(tmp)` writes into a sibling temp dir that is renamed
    into place; an existing `out` is replaced only when `force` (and check_output allows it)."""
    out = check_output(out, force, want, inputs)
    with scratch_dir(out) as scratch:
        tmp, old = scratch / out.name, scratch / "old"
        tmp.mkdir()
        fill(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        if os.path.lexists(out):
            check_output(out, force, want, inputs)  # again: it may have changed while we worked
            os.rename(out, old)  # moved aside, not deleted, until the new one is in place
        try:
            os.rename(tmp, out)
        except BaseException:
            if old.exists():
                os.rename(old, out)
            raise
        _fsync(out.parent)
    return out


@contextlib.contextmanager
def run_lock(run: Path):
    """Hold RUN/.siftc.lock (fcntl) while this process writes the run; a second writer is refused.
    The kernel drops the lock when the process dies, however it dies."""
    path = Path(run) / LOCK
    with os_errors(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UsageError(f"{run} is being written by another siftc process (pid {pid}); wait for it "
                             f"to finish, or choose another -o") from None
        with os_errors(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


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
