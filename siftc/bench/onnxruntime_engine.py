"""ONNX Runtime, CPU execution provider: dense kernels, so zeros cost as much as any weight. It is the
"no sparsity support" line of the benchmark."""
from siftc.bench.engine import Engine
from siftc.errors import EngineError


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    @classmethod
    def available(cls):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise EngineError("ONNX Runtime is not installed; pip install onnxruntime") from e

    def __init__(self, path, batch, threads):
        super().__init__(path, batch, threads)
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads   # one operator across `threads` cores, as the others do
        opts.inter_op_num_threads = 1         # sequential graph: no second pool competing for cores
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads spin-wait by default, stealing the cores from the engine measured next.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise EngineError(f"ONNX Runtime could not load {path}: {str(e).splitlines()[0]}") from e
        self._names = [i.name for i in self._sess.get_inputs()]

    def run(self, inputs):
        return self._sess.run(None, dict(zip(self._names, inputs)))

    def details(self):
        import onnxruntime as ort
        return {"version": ort.__version__}

    def close(self):
        self._sess = None
