"""DeepSparse (Neural Magic): compiles the ONNX file, finds the exact zeros in the weights at compile
time and runs those layers with sparse kernels.

`details()` reports `supported_fraction`, the share of the graph DeepSparse runs on its own kernels
(`Engine.fraction_of_supported_ops`). Below 1.0 it also reports which sparse layers fell back:
DeepSparse's per-layer analysis (`DebugAnalysisEngine`, compiled once more at the same batch) names the
ONNX nodes each of its kernels runs, and every MatMul/Gemm/Conv fed by a sparse weight must be among them.
The analysis runs in a child process: a failed assertion inside DeepSparse aborts the whole process (at
batch 1 on a file with a static batch of 64 it does), and that must not take the measurements with it.

DeepSparse's C++ library writes a banner to file descriptor 2 on a process's first compile
("DeepSparse, Copyright ... version: 1.8.0 COMMUNITY | (e3778e93) (release) (optimized) (system=avx2,
binary=avx2)"), past Python's sys.stderr and so through the CLI's progress bar. Compiles run with that
descriptor captured; the banner's version line becomes `details()["deepsparse_version"]`, anything else
DeepSparse wrote there `details()["deepsparse_messages"]` (and the tail of a compile error's message).
"""
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

from siftc.bench.engine import Engine
from siftc.errors import EngineError
from siftc.export import _stdout_to_devnull

INSTALL = "pip install 'siftc[deepsparse]' (DeepSparse 1.8.0: Linux x86-64 with AVX2, Python 3.8-3.11)"


class DeepSparseEngine(Engine):
    name = "deepsparse"

    @classmethod
    def available(cls):
        if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
            raise EngineError(f"DeepSparse does not run on {sys.platform}/{platform.machine()} "
                              f"(Linux x86-64 only); use --engine onnxruntime,torch")
        if not (3, 8) <= sys.version_info[:2] <= (3, 11):
            raise EngineError(f"DeepSparse 1.8.0 supports Python 3.8-3.11, this is "
                              f"{sys.version.split()[0]}; use --engine onnxruntime,torch")
        try:
            import deepsparse
        except Exception as e:  # ImportError, or its own platform check failing at import
            raise EngineError(f"DeepSparse is not usable here ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              f"{INSTALL}, or use --engine onnxruntime,torch") from e
        if platform.machine() == "x86_64" and not deepsparse.cpu_avx2_compatible():
            raise EngineError("DeepSparse needs a CPU with AVX2; use --engine onnxruntime,torch")

    def __init__(self, path, batch, threads):
        super().__init__(path, batch, threads)
        import deepsparse
        try:
            with _stdout_to_devnull(), _stderr_captured() as written:
                self._engine = deepsparse.Engine(str(path), batch_size=batch, num_cores=threads)
        except Exception as e:
            said = "; ".join(_messages(written)[-2:])
            raise EngineError(f"DeepSparse could not compile {path}: {str(e).splitlines()[0]}"
                              + (f" (DeepSparse said: {said})" if said else "")) from e
        global _VERSION
        _VERSION = _banner_version(written) or _VERSION or deepsparse.__version__
        self._messages = _messages(written)

    def run(self, inputs):
        return self._engine.run(inputs, val_inp=False)

    def details(self):
        d = {"supported_fraction": self._engine.fraction_of_supported_ops, "num_cores": self._engine.num_cores,
             "deepsparse_version": _VERSION}
        if self._messages:
            d["deepsparse_messages"] = self._messages
        if d["supported_fraction"] < 1.0:
            try:
                d["sparse_layers_fallback"] = sparse_layers_off_kernels(self.path, self.batch, self.threads)
            except EngineError as e:
                d["sparse_layers_fallback"], d["analysis_note"] = None, str(e)
        return d

    def close(self):
        self._engine = None


_VERSION = None  # the banner's version line, once a compile in this process has printed it
_BANNER = re.compile(r"DeepSparse, Copyright .*?version: (?P<version>.+)$")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@contextlib.contextmanager
def _stderr_captured():
    """File descriptor 2 into a temporary file; yields a list that holds the lines written there.

    Python's own sys.stderr meanwhile writes to the real descriptor, so a progress bar drawn through
    it (rich redraws every 0.1 s) keeps moving during a minutes-long compile instead of being captured."""
    written = []
    python_stderr = sys.stderr
    python_stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp, open(saved, "w", buffering=1, closefd=False) as terminal:
            os.dup2(tmp.fileno(), 2)
            sys.stderr = terminal
            try:
                yield written
            finally:
                sys.stderr = python_stderr
                os.dup2(saved, 2)
                tmp.seek(0)
                written.extend(tmp.read().decode(errors="replace").splitlines())
    finally:
        os.close(saved)


def _banner_version(lines) -> str | None:
    """'1.8.0 COMMUNITY | (e3778e93) (release) (optimized) (system=avx2, binary=avx2)' from the banner."""
    return next((m["version"].strip() for line in lines if (m := _BANNER.search(line))), None)


def _messages(lines) -> list[str]:
    """What DeepSparse wrote besides its banner, without terminal control codes."""
    text = (_ANSI.sub("", part).strip() for line in lines for part in line.split("\r"))
    return [t for t in text if t and not _BANNER.search(t)]


def sparse_weight_nodes(path) -> dict:
    """ONNX node output -> initializer, for every MatMul/Gemm/Conv whose weight has exact zeros
    (the sidecar names the sparse initializers when there is one; otherwise any zero fraction >= 1/2)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from siftc.store import read_sidecar
    model = onnx.load(str(path))
    meta = read_sidecar(path)
    if meta is not None:
        sparse = {layer["initializer"] for layer in meta["layers"] if layer.get("initializer")}
    else:
        sparse = set()
        for t in model.graph.initializer:
            a = numpy_helper.to_array(t)
            if a.ndim >= 2 and np.count_nonzero(a) <= a.size // 2:
                sparse.add(t.name)
    return {n.output[0]: w for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
            for w in n.input if w in sparse}


ANALYSIS_TIMEOUT_S = 1800  # compiling a 90% Sparse Wide ResNet-18 at batch 64 takes minutes on 2 busy cores


def sparse_layers_off_kernels(path, batch, threads) -> list[str]:
    """Initializers of sparse layers DeepSparse does not run on its own kernels (empty: all on them),
    from DeepSparse's layer analysis in a child process; EngineError if the analysis fails."""
    cmd = [sys.executable, "-m", __name__, str(path), str(batch), str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ANALYSIS_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise EngineError(f"DeepSparse's layer analysis of {path} took over {ANALYSIS_TIMEOUT_S}s") from e
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = next((line.strip() for line in proc.stderr.splitlines() if "Assertion" in line or "Error" in line),
                   f"exit code {proc.returncode}")
        raise EngineError(f"DeepSparse's layer analysis of {path} failed ({why}); which sparse layers "
                          f"fell back is unknown")
    return json.loads(lines[-1])


def _analyze(path, batch, threads) -> list[str]:
    """The child process's work: compile with DebugAnalysisEngine and compare its layers with the
    sparse weights' nodes."""
    from deepsparse.engine import DebugAnalysisEngine
    eng = DebugAnalysisEngine(str(path), batch_size=batch, num_cores=threads, num_iterations=1,
                              num_warmup_iterations=0)
    analysis = eng.analyze(eng.generate_random_inputs())
    covered = set()

    def walk(layers):
        for layer in layers:
            if not layer["name"].startswith("Naive"):  # "Naive Subgraph": DeepSparse's fallback executor
                covered.update(layer["canonical_name"].split(","))
            walk(layer.get("sub_layer_info", []))

    walk(analysis["layer_info"])
    return sorted(w for out, w in sparse_weight_nodes(path).items() if out not in covered)


if __name__ == "__main__":  # python -m siftc.bench.deepsparse_engine MODEL.onnx BATCH THREADS
    print(json.dumps(_analyze(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
