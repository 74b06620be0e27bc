"""Build the native kernels on first use and register them as `torch.ops.siftc.*`.

The C++ sources in `csrc/` are compiled once per machine with `torch.utils.cpp_extension.load` into
`$TORCH_EXTENSIONS_DIR/torch<version>/siftc_native-<hash>` (default root `~/.cache/siftc/torch_extensions`);
later processes load the cached library in well under a second. The directory is named by the torch
version and a hash of the sources and flags, so a changed .cpp always builds afresh (torch's own check
compares file times, which a copy or an install can preserve) and checkouts with different sources do not
overwrite each other's library. Compiler flags are `-O3 -march=native`: the build machine is the machine that runs it.
Importing siftc never builds anything; `load()` does.
"""
import hashlib
import os
import shutil
import threading
from pathlib import Path

import torch

from siftc.errors import SiftcError

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
NAME = "siftc_native"
CFLAGS = ["-O3", "-march=native", "-fno-math-errno"]
_lock = threading.Lock()
_loaded = False


class BuildError(SiftcError):
    """The native kernels could not be compiled or loaded here."""


def build_dir() -> Path:
    """Where the compiled library is cached: $TORCH_EXTENSIONS_DIR, else ~/.cache/siftc/torch_extensions.

    The torch version is part of the path, so upgrading torch rebuilds instead of loading a stale ABI, and
    so is a hash of the sources' contents and the flags, so editing a source rebuilds.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(Path.home(), ".cache", "siftc", "torch_extensions")
    tag = f"torch{torch.__version__.replace('+', '_')}"
    return Path(root) / tag / f"{NAME}-{sources_hash()}"


def sources_hash() -> str:
    """12 hex digits of SHA-256 over the sources (name and contents) and the compiler flags."""
    h = hashlib.sha256(" ".join(CFLAGS).encode())
    for src in SOURCES:
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    return h.hexdigest()[:12]


def load(verbose: bool = False):
    """Compile (first time) and load the kernels; afterwards `torch.ops.siftc.*` exist. Idempotent."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise BuildError(f"no C++ compiler ({compiler!r}) on PATH to build siftc's native kernels; install g++ "
                             "(e.g. `apt-get install g++`) or use `--backend torch`")
        from torch.utils import cpp_extension
        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        try:
            cpp_extension.load(
                name=NAME, sources=[str(s) for s in SOURCES], build_directory=str(out),
                extra_cflags=CFLAGS,
                is_python_module=False, verbose=verbose)
        except (RuntimeError, OSError, ImportError) as e:
            raise BuildError(f"building siftc's native kernels in {out} failed ({str(e).splitlines()[0]}); "
                             "rerun with verbose=True to see the compiler output, or use `--backend torch`") from e
        from siftc.runtime import _ops  # registers fake (meta) kernels and autograd for the ops
        _ops.register()
        _loaded = True
