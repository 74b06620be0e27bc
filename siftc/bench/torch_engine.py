"""PyTorch eager on the model the ONNX file was exported from.

The torch engine does not read the ONNX graph: the sidecar (`model.onnx.json`) names the source (an
artifact directory or a model.py spec), and `siftc.export.rebuild` loads it and folds the masks exactly
as the export did, so torch computes the same function on the same weights. Dense kernels, like ONNX
Runtime: it shows what a PyTorch user gets without a sparse engine. A file without a siftc sidecar
cannot be run by this engine.

A sidecar is a file beside the ONNX file, not a promise: building the model from an artifact runs no
code but siftc's and torch's (siftc.load), but a sidecar naming a model.py would import and run that
file, so the engine does that only with --trust-source (siftc.artifact.trusting), as does an
artifact that needs its model file.
"""
from siftc.artifact import trusted
from siftc.bench.engine import Engine
from siftc.errors import EngineError, SiftcError
from siftc.store import read_sidecar


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, path, batch, threads):
        super().__init__(path, batch, threads)
        import torch

        from siftc.export import rebuild
        src = ((read_sidecar(path) or {}).get("source") or {})
        if src.get("type") == "model" and not trusted():
            raise EngineError(f"{path} was exported from {src.get('spec')}, which it would import and "
                              f"run to rebuild the model; pass --trust-source if you trust that file")
        try:
            self._model, _, _ = rebuild(path)
        except SiftcError as e:
            raise EngineError(f"torch engine cannot rebuild the PyTorch model of {path}: {e}") from e
        self._torch = torch

    def run(self, inputs):
        torch = self._torch
        if torch.get_num_threads() != self.threads:  # global setting: other code may have changed it
            torch.set_num_threads(self.threads)
        from siftc.export_checks import flat_outputs
        with torch.inference_mode():
            return flat_outputs(self._model(*(torch.from_numpy(x) for x in inputs)))

    def details(self):
        return {"version": self._torch.__version__}

    def close(self):
        self._model = None
