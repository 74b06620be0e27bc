"""Build the native kernels on first use and register them as `torch.ops.siftc.*`.

The C++ sources in `csrc/` are compiled once per machine with `torch.utils.cpp_extension.load` into
`$TORCH_EXTENSIONS_DIR/torch<version>/siftc_native-<hash>` (default root `~/.cache/siftc/torch_extensions`);
later processes load the cached library in well under a second. The directory is named by the torch
version and a hash of the sources and flags, so a changed .cpp always builds afresh (torch's own check
compares file times, which a copy or an install can preserve) and checkouts with different sources do not
overwrite each other's library. Compiler flags are `-O3 -march=native`: the build machine is the machine that runs it.
Importing siftc never builds anything; `load()` does. `build_in_background()` starts every uncached library's
compile at once, in processes of its own, for a session (the test suite) that loads them later: a `load()`
meanwhile waits for that build (torch's lock file in the build directory) instead of starting its own.

Each kernel family is its own library (LIBRARIES), with its own sources, hash and cache directory, so a
change to one family's source rebuilds only that library; every library's ops join `torch.ops.siftc`.
"""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
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


def is_built(name: str = NAME) -> bool:
    """Whether the library for the current sources, flags and torch is in the cache (its build finished)."""
    return (build_dir(name) / f"{name}.so").is_file()


def build_in_background() -> list:
    """Start compiling each library of LIBRARIES that is not cached yet, all at once, a process each; return
    the processes, for `stop_background`. Nothing is loaded here, and a failed build only leaves the library
    uncached: the first `load()` / `load_library()` of it raises the BuildError with the reason.

    First use compiles one library after another, and ninja runs only one library's sources in parallel;
    here the libraries compile together and alongside whatever this process does meanwhile.
    """
    return [subprocess.Popen([sys.executable, "-c", f"from siftc.runtime import build; build.load_library({name!r})"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # so stop_background can interrupt its compilers too
            for name in LIBRARIES if not is_built(name)]


def stop_background(builds: list):
    """Interrupt the builds of build_in_background that are still running, and wait for them. SIGINT, not a
    kill: torch then removes its lock file and ninja its half-written objects, so the next load rebuilds
    cleanly instead of waiting forever on a stale lock."""
    for p in builds:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGINT)
            except ProcessLookupError:  # it ended meanwhile
                pass
    for p in builds:
        p.wait()


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
    """Compile (first time) and load a library of LIBRARIES; for one other than NAME (whose Python halves
    `load()` registers) its caller registers its Python halves."""
    if name == NAME:
        return load(verbose)
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
    while (out / "lock").exists():  # another process is building it (build_in_background): let it finish, so
        time.sleep(0.1)             # that the load below runs ninja itself and a failed build says why here
    try:
        cpp_extension.load(
            name=name, sources=[str(s) for s in library_sources(name)], build_directory=str(out),
            extra_cflags=CFLAGS, is_python_module=False, verbose=verbose)
    except (RuntimeError, OSError, ImportError) as e:
        raise BuildError(f"building siftc's {name} kernels in {out} failed ({str(e).splitlines()[0]}); "
                         "rerun with verbose=True to see the compiler output, or use `--backend torch`") from e
