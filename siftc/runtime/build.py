"""Build the native kernels on first use and register them as `torch.ops.siftc.*`.

The C++ sources in `csrc/` are compiled once per machine with `torch.utils.cpp_extension.load` into
`$TORCH_EXTENSIONS_DIR/torch<version>/siftc_native-<hash>` (default root `~/.cache/siftc/torch_extensions`);
later processes load the cached library in well under a second. The directory is named by the torch
version and a hash of the sources and flags, so a changed .cpp always builds afresh (torch's own check
compares file times, which a copy or an install can preserve) and checkouts with different sources do not
overwrite each other's library. Compiler flags are `-O3 -march=native`: the build machine is the machine that runs it.
Importing siftc never builds anything; `load()` does.

Each kernel family is its own library (LIBRARIES), with its own sources, hash and cache directory, so a
change to one family's source rebuilds only that library; every library's ops join `torch.ops.siftc`.
"""
import hashlib
import os
import shutil
import threading
from pathlib import Path

import torch

from siftc.errors import SiftcError

CSRC = Path(__file__).parent / "csrc"
LIBRARIES = {"siftc_native": ["sparse_ops.cpp"], "siftc_block": ["block_ops.cpp", "block_conv.cpp"]}
"""Library name -> its sources in csrc/ (siftc_block: the block / N:M Linear and Conv2d kernels, loaded by
siftc.runtime.block and siftc.runtime.block_conv)."""
HEADERS = {"siftc_block": ["block_simd.h"]}
"""Library name -> the csrc/ headers its sources include: hashed with them, not compiled on their own."""
NAME = "siftc_native"
SOURCES = [CSRC / s for s in LIBRARIES[NAME]]
CFLAGS = ["-O3", "-march=native", "-fno-math-errno"]
_lock = threading.Lock()
_loaded = False
_libraries = set()  # libraries other than NAME loaded by load_library


class BuildError(SiftcError):
    """The native kernels could not be compiled or loaded here."""


def library_sources(name: str = NAME) -> list:
    return SOURCES if name == NAME else [CSRC / s for s in LIBRARIES[name]]


def build_dir(name: str = NAME) -> Path:
    """Where the compiled library is cached: $TORCH_EXTENSIONS_DIR, else ~/.cache/siftc/torch_extensions.

    The torch version is part of the path, so upgrading torch rebuilds instead of loading a stale ABI, and
    so is a hash of the sources' contents and the flags, so editing a source rebuilds.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(Path.home(), ".cache", "siftc", "torch_extensions")
    tag = f"torch{torch.__version__.replace('+', '_')}"
    return Path(root) / tag / f"{name}-{sources_hash(name)}"


def sources_hash(name: str = NAME) -> str:
    """12 hex digits of SHA-256 over the library's sources and headers (name and contents) and the compiler
    flags."""
    h = hashlib.sha256(" ".join(CFLAGS).encode())
    for src in library_sources(name) + [CSRC / s for s in HEADERS.get(name, [])]:
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
        _compile(NAME, verbose)
        from siftc.runtime import _ops  # registers fake (meta) kernels and autograd for the ops
        _ops.register()
        _loaded = True


def load_library(name: str, verbose: bool = False):
    """Compile (first time) and load another library of LIBRARIES; its caller registers its Python halves."""
    if name in _libraries:
        return
    with _lock:
        if name in _libraries:
            return
        _compile(name, verbose)
        _libraries.add(name)


def _compile(name: str, verbose: bool):
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler ({compiler!r}) on PATH to build siftc's native kernels; install g++ "
                         "(e.g. `apt-get install g++`) or use `--backend torch`")
    from torch.utils import cpp_extension
    out = build_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=name, sources=[str(s) for s in library_sources(name)], build_directory=str(out),
            extra_cflags=CFLAGS, is_python_module=False, verbose=verbose)
    except (RuntimeError, OSError, ImportError) as e:
        raise BuildError(f"building siftc's {name} kernels in {out} failed ({str(e).splitlines()[0]}); "
                         "rerun with verbose=True to see the compiler output, or use `--backend torch`") from e
