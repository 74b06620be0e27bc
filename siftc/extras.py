"""Optional dependencies: imported where a feature needs them, and a missing one is a one-line error
naming the extra that installs it (`pip install 'siftc[plot]'`), never an ImportError traceback."""
import importlib
import importlib.util

from siftc.errors import UsageError

EXTRAS = {"matplotlib": "plot", "sklearn": "data", "deepsparse": "deepsparse", "transformers": "transformers",
          "tensorboard": "tensorboard", "lightning": "lightning"}  # top-level package -> the extra bringing it


class MissingExtra(UsageError, ImportError):
    """An optional package is not installed; the message says which extra installs it. An ImportError
    too, so a module that needs it at import (siftc.integrations.*) fails to import as Python expects."""


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, feature: str):
    """`module`, imported; or MissingExtra saying `feature` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{feature} needs {module}, which is not installed here: "
                           f"pip install 'siftc[{EXTRAS[module.partition('.')[0]]}]'") from e
