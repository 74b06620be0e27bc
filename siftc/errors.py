"""The error family. Every message says what is wrong, where, and how to fix it, on one line.

The CLI turns any SiftcError into `siftc: error: <message>` and exit code 2; anything else is a bug
and keeps its traceback.
"""


class SiftcError(Exception):
    """A problem with what the user gave siftc (a file, a flag, a model, an artifact)."""


class UsageError(SiftcError):
    """An argument is out of range or does not fit the others."""


class ModelLoadError(SiftcError):
    """`model.py[:factory]` could not be imported or did not yield an nn.Module."""


class TraceError(SiftcError):
    """torch.fx could not trace the model, or a traced graph cannot be transformed."""


class ArtifactError(SiftcError):
    """An artifact directory is missing, corrupt, truncated or not siftc's."""


class EngineError(SiftcError):
    """An inference engine is missing, unsupported here, or refused the model."""
