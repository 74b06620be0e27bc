"""Pretrained weights in: a dense model's state dict read from a file and loaded into the model before it is
converted, and, after conversion, which layers kept those values.

    .pt / .pth / .bin   `torch.save(model.state_dict(), ...)`, read with torch.load(weights_only=True):
                        tensors and containers, never code
    .safetensors        the safetensors format (no pickle at all; the `safetensors` package reads it)

The file must be a state dict of the model as its factory builds it: a missing or unexpected key, or a
tensor of another shape, is a one-line error naming the first such key and both shapes. The file's name
and sha256 go into the conversion report ("weights") as provenance.

    >>> state = read_state("dense.pt")                 # {name: tensor}
    >>> load_into(model, state, "dense.pt")            # the model's own values replaced
    >>> snap = snapshot(gm)                            # before a pass rewrites gm ...
    >>> origins(gm, snap)                              # ... after: {"net.2": "kept", "net.4": "fresh"}
"""
import re
from pathlib import Path

import torch
from torch import nn

from siftc.errors import UsageError
from siftc.layers import layer_type
from siftc.nn.sparse import SPARSE_LAYERS
from siftc.store import file_sha256

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS = ".safetensors"


def read_state(path) -> dict:
    """The state dict stored at `path` ({name: tensor}), read without running any code."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file {path} not found; pass a state dict saved with "
                         f"torch.save(model.state_dict(), 'w.pt') or a .safetensors file")
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS):
        raise UsageError(f"weights file {path} is neither {'/'.join(TORCH_SUFFIXES)} (torch.save) nor "
                         f"{SAFETENSORS}; save the state dict under one of those suffixes")
    try:
        state = _read_safetensors(path) if suffix == SAFETENSORS else \
            torch.load(path, map_location="cpu", weights_only=True)
    except UsageError:
        raise
    except Exception as e:  # unpickling refused (not weights only), a truncated file, a foreign format
        raise UsageError(f"cannot read weights file {path}: {_why(e)}; save a state dict of tensors "
                         f"(torch.save(model.state_dict(), ...) or safetensors.torch.save_file)") from e
    if not isinstance(state, dict) or not state:
        raise UsageError(f"weights file {path} holds a {type(state).__name__}{' (empty)' if state == {} else ''}, "
                         f"not a state dict; save model.state_dict()")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UsageError(f"weights file {path} is not a flat state dict: entry {bad!r} is a "
                         f"{type(state[bad]).__name__}, not a tensor; save model.state_dict() itself")
    return state


def _why(e: Exception) -> str:
    """torch.load's reason in a few words: the object weights_only refused, or a corrupt file."""
    text = str(e)
    if isinstance(e, PermissionError):
        return "permission denied"
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return f"it holds a {refused[1]} object, which a weights-only read refuses (it would run code)"
    if isinstance(e, OSError) or any(w in text for w in ("WeightsUnpickler", "load key", "Unsupported operand",
                                                         "PytorchStreamReader", "header", "deserializ")):
        return "corrupt or truncated (not a file of that format)"
    return next((line for line in text.splitlines() if line.strip()), type(e).__name__)[:200]


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise UsageError(f"reading {path} needs the safetensors package, which is not installed here: "
                         f"pip install safetensors") from e
    return load_file(str(path), device="cpu")


def load_into(model: nn.Module, state: dict, path) -> None:
    """Copy `state` into `model`'s parameters and buffers, after checking it fits: the same keys (a key
    tied to another, such as a shared embedding and LM head, may be stored once) and shapes."""
    own = model.state_dict()
    for key, want in own.items():
        got = state.get(key)
        if got is not None and tuple(got.shape) != tuple(want.shape):
            raise UsageError(f"weights file {path} does not fit the model: {key} is {_shape(got)} in the file, "
                             f"{_shape(want)} in the model; pass the weights of this model (or --model-arg to "
                             f"build the model they were saved from)")
    aliases = _aliases(model)
    missing = [k for k in own if k not in state and not any(a in state for a in aliases.get(k, ()))]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise UsageError(f"weights file {path} lacks {missing[0]} ({_shape(own[missing[0]])} in the model"
                         f"{f'; {len(missing) - 1} more keys missing' if len(missing) > 1 else ''}); pass a "
                         f"complete state dict of this model")
    if unexpected:
        raise UsageError(f"weights file {path} has {unexpected[0]} ({_shape(state[unexpected[0]])}), which the "
                         f"model lacks{f' ({len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}; pass "
                         f"the weights of this model (or --model-arg to build the model they were saved from)")
    full = {k: state[k] if k in state else state[next(a for a in aliases[k] if a in state)] for k in own}
    model.load_state_dict(full, strict=True)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """state-dict key -> the other keys naming the same tensor (tied weights)."""
    by_tensor: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(t), []).append(key)
    return {k: [o for o in keys if o != k] for keys in by_tensor.values() for k in keys}


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def provenance(path) -> dict:
    """What the report records of a weights file: its name and sha256."""
    path = Path(path)
    return {"file": path.name, "sha256": file_sha256(path)}


# ---- which layers kept the dense model's values -------------------------------------------------------

def snapshot(gm: nn.Module, names) -> dict[str, torch.Tensor]:
    """The weights of the layers `names`, in torch layout (out, in, *kernel), before a pass rewrites gm.
    References, not copies: passes build new modules and leave the old tensors as they were."""
    out = {}
    for name in names:
        w = _torch_weight(gm.get_submodule(name))
        if w is not None:  # nn.MultiheadAttention kept whole has no one weight
            out[name] = w
    return out


def _torch_weight(mod: nn.Module) -> torch.Tensor | None:
    t = layer_type(mod)
    if hasattr(t, "torch_state"):  # Linear, Conv, HF Conv1D (whose weight is stored transposed)
        return t.torch_state(mod)["weight"]
    w = getattr(mod, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


@torch.no_grad()
def origins(gm: nn.Module, dense: dict[str, torch.Tensor]) -> dict[str, str]:
    """Per layer: "kept" if what now sits at its name has the dense weight's shape and holds its values
    (all of them, or those at a sparse layer's positions), else "fresh" (another shape, initialised by
    the layer's own init, as the paper does)."""
    out = {}
    for name, w in dense.items():
        mod = gm.get_submodule(name)
        t = layer_type(mod)
        if t is None:  # a block (parallel branches, factors) replaced the layer
            out[name] = "fresh"
        elif isinstance(mod, SPARSE_LAYERS):
            same = mod.weight_shape == tuple(w.shape) and \
                torch.equal(mod.values, w.reshape(-1)[mod.positions.long()].to(mod.values.dtype))
            out[name] = "kept" if same else "fresh"
        else:
            own = _torch_weight(mod)
            out[name] = "kept" if own is not None and own.shape == w.shape and torch.equal(own, w) else "fresh"
    return out


def summary(layers: list[dict], weights: dict | None) -> str:
    """One line of what the report's per-layer "init" says, e.g. "pretrained values (dense.pt) kept in
    net.0, net.2, net.4, net.6; initialised fresh: none"."""
    kept = [r["name"] for r in layers if r.get("init") == "kept"]
    fresh = [r["name"] for r in layers if r.get("init") == "fresh"]
    what = f"pretrained values ({weights['file']})" if weights else "the dense model's values"
    return (f"{what} kept in {_names(kept)}; initialised fresh (new shapes): {_names(fresh)}")


def _names(names: list[str], at_most: int = 6) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - at_most} more)" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more

