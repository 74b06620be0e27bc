"""The error family. Every message says what is wrong, where, and how to fix it, on one line.

The CLI turns any SiftcError into `siftc: error: <message>` and exit code 2. Anything else is a bug:
`internal_error` makes it one line naming the fx node or the siftc line it happened at, which the CLI
prints with exit code 1 (the traceback only with --debug).
"""
import linecache
import re
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


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


def internal_error(e: BaseException) -> str:
    """`<Type>: <first line> (at <where>)` for an exception that is not a SiftcError, told by its root
    cause (`raise ... from`: the wrapper's message is usually a dump of its context). Where: the fx node
    being worked on (a `node` local of a frame, innermost first, or the line of a GraphModule's
    generated code that raised), and the innermost frame in siftc's own files."""
    frames, root = _frames(e), e
    while root.__cause__ is not None:
        root = root.__cause__
        frames += _frames(root)  # the cause's frames are inside the wrapper's
    first = next((line.strip() for line in str(root).splitlines() if line.strip()), "")[:300]
    text = f"{type(root).__name__}: {first}" if first else type(root).__name__
    where = [w for w in (_fx_node(frames), _siftc_line(frames)) if w]
    return f"{text} (at {', '.join(where)})" if where else text


def _frames(e: BaseException) -> list:
    """(frame, line) of each traceback entry of `e`, outermost first."""
    frames, tb = [], e.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    return frames


def _fx_node(frames) -> str | None:
    fx = sys.modules.get("torch.fx")
    for frame, lineno in reversed(frames):
        node = frame.f_locals.get("node")
        if fx is not None and isinstance(node, fx.Node):
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
            return f"fx node {node.name} ({node.op} {target})"
        if frame.f_code.co_filename.startswith("<eval_with_key>"):  # GraphModule.forward: `name = op(...)`
            assigned = re.match(r"\s*(\w+) = ", linecache.getline(frame.f_code.co_filename, lineno))
            if assigned:
                return f"fx node {assigned.group(1)}"
    return None


def _siftc_line(frames) -> str | None:
    for frame, lineno in reversed(frames):
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(_PACKAGE):
            return f"{path.relative_to(_PACKAGE.parent)}:{lineno}"
    return None
