"""One engine interface; DeepSparse, ONNX Runtime and PyTorch behind it.

An engine is built for one (file, batch, threads) and then only runs:

    eng = get_engine("onnxruntime")(path, batch=64, threads=2)
    outputs = eng.run(inputs)       # inputs: list of numpy arrays in the file's input order
    eng.details()                   # engine facts for the report, e.g. {"supported_fraction": 1.0}

Engines import their library lazily, inside `available()` and `__init__`, so a missing or unsupported
library (DeepSparse: Linux x86-64, Python 3.8-3.11) is an EngineError with what to do, and the
other engines still run.
"""
import importlib

from siftc.errors import EngineError

# CLI name -> "module:class". The CLI's --engine choices come from here.
ENGINES = {
    "deepsparse": "siftc.bench.deepsparse_engine:DeepSparseEngine",
    "onnxruntime": "siftc.bench.onnxruntime_engine:OnnxRuntimeEngine",
    "torch": "siftc.bench.torch_engine:TorchEngine",
}


class Engine:
    """Base class: subclasses set `name`, implement `available`, `__init__` and `run`."""
    name = "engine"

    @classmethod
    def available(cls) -> None:
        """Raise EngineError (what is missing, how to get it) if this engine cannot run here."""

    def __init__(self, path: str, batch: int, threads: int):
        self.path, self.batch, self.threads = path, batch, threads

    def run(self, inputs: list) -> list:
        raise NotImplementedError

    def details(self) -> dict:
        return {}

    def close(self) -> None:
        """Free the compiled model (engines can hold hundreds of MB)."""


def get_engine(name: str) -> type[Engine]:
    """The engine class for a CLI name, after checking it can run here."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose from: {', '.join(ENGINES)}")
    module, attr = ENGINES[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    cls.available()
    return cls


def parse_engines(text: str) -> list[str]:
    """'deepsparse,onnxruntime' -> ['deepsparse', 'onnxruntime'], rejecting unknown names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown or not names:
        raise EngineError(f"unknown engine {', '.join(unknown) or repr(text)}; choose from: {', '.join(ENGINES)} "
                          f"(comma-separated, e.g. --engine deepsparse,onnxruntime)")
    return list(dict.fromkeys(names))
