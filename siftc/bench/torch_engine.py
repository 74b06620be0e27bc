"""PyTorch eager on the model the ONNX file was exported from.

The torch engine does not read the ONNX graph: the sidecar (`model.onnx.json`) names the source (an
artifact directory or a model.py spec), and `siftc.export.rebuild` loads it and folds the masks exactly
as the export did, so torch computes the same function on the same weights. Dense kernels, like ONNX
Runtime: it shows what a PyTorch user gets without a sparse engine. A file without a siftc sidecar
cannot be run by this engine.
"""
from siftc.bench.engine import Engine
from siftc.errors import EngineError, SiftcError


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, path, batch, threads):
        super().__init__(path, batch, threads)
        import torch

        from siftc.export import rebuild
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
