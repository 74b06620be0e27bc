"""A converted model on disk: a directory with

    siftc.json   format tag, source (model spec + file hash), config, report, checksums
    weights.pt   the state dict (weights, masks, norm statistics); a sparse layer's weight is stored as
                 its values inside the mask (`<name>.weight@values`) and its mask as bits
                 (`<name>.mask@bits`), so a 90% Sparse Wide ResNet-18 takes 59 MB, not 558 MB
    inputs.pt    the example inputs the conversion traced with

Loading never unpickles code: tensors come back through `torch.load(weights_only=True)`, the rest is
JSON, and the module structure is rebuilt by importing the recorded model file and re-running the same
(seeded, deterministic) conversion. Writing goes to a temporary directory renamed into place, so a
failed save leaves nothing half-written (siftc.store.write_dir).
"""
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from siftc.config import ConvertConfig
from siftc.errors import ArtifactError, SiftcError, UsageError
from siftc.source import Source, load_model
from siftc.store import file_sha256, os_errors, verify_digest, write_dir

FORMAT = "siftc-artifact"
VERSION = 2  # 2: sparse layers stored as values inside the mask + mask bits
FILES = ("siftc.json", "weights.pt", "inputs.pt")


def save(gm, out: str | os.PathLike, force: bool = False, inputs=()) -> Path:
    """Save a model returned by `siftc.convert` as an artifact directory. `force` replaces an existing
    artifact only (never `inputs`, the files the command read; see siftc.store.check_output)."""
    info = getattr(gm, "siftc_info", None)
    if info is None:
        raise UsageError("this model was not produced by siftc.convert; convert it first")

    def fill(tmp: Path):
        torch.save(pack_state(gm.state_dict()), tmp / "weights.pt")
        torch.save(list(info.example_inputs), tmp / "inputs.pt")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "source": info.source.to_json() if info.source else None,
            "config": info.config.to_json(),
            "report": info.report,
            "sha256": {f: file_sha256(tmp / f) for f in ("weights.pt", "inputs.pt")},
        }
        (tmp / "siftc.json").write_text(json.dumps(meta, indent=1))

    source = info.source.path if info.source else None
    return write_dir(Path(out), force, fill, want=FORMAT, inputs=(*inputs, source))


def read_meta(path: str | os.PathLike, verify: bool = True) -> dict:
    """The artifact's JSON, after checking it is a complete siftc artifact."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact {path} not found; pass the directory written by `siftc convert -o`")
    if not path.is_dir() or not (path / "siftc.json").is_file():
        raise ArtifactError(f"{path} is not a siftc artifact (no siftc.json); pass a directory written "
                            f"by `siftc convert -o`")
    try:
        with os_errors(path / "siftc.json", "read"):
            meta = json.loads((path / "siftc.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path / 'siftc.json'} is corrupt ({e}); convert the model again") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a siftc artifact (format tag missing); convert the model again")
    if meta.get("version") != VERSION:
        raise ArtifactError(f"{path} has artifact version {meta.get('version')}, this siftc reads "
                            f"{VERSION}; convert the model again with this siftc")
    for key in ("config", "report", "sha256"):
        if not isinstance(meta.get(key), dict):
            raise ArtifactError(f"{path / 'siftc.json'} lacks {key!r}: truncated or corrupt; convert again")
    _check_report(path, meta["report"])
    if set(meta["sha256"]) != set(FILES[1:]) or not all(isinstance(d, str) for d in meta["sha256"].values()):
        raise ArtifactError(f"{path / 'siftc.json'} has no checksums of {', '.join(FILES[1:])}: "
                            f"corrupt; convert the model again")
    if verify:
        for name, digest in meta["sha256"].items():
            f = path / name
            verify_digest(f, digest, error=ArtifactError,
                          missing=f"{f} is missing: the artifact is incomplete; convert the model again",
                          changed=f"{f} does not match its checksum: truncated or corrupt; convert the model again")
    return meta


REPORT_KEYS = ("kind", "sparsity", "dense_flops", "flops", "flop_ratio", "extra_flops", "params",
               "nonzero_params", "dense_params", "layers")
LAYER_KEYS = ("name", "kind", "dense_shape", "new_shape", "density", "dense_flops", "flops", "search_space",
              "reason")


def _check_report(path: Path, report: dict):
    """The keys `siftc inspect` prints (and --json promises) are there."""
    missing = [k for k in REPORT_KEYS if k not in report]
    layers = report.get("layers")
    if not missing and (not isinstance(layers, list) or not all(isinstance(r, dict) for r in layers)):
        missing = ["layers"]
    if not missing:
        missing = [f"layers[{i}].{k}" for i, r in enumerate(layers) for k in LAYER_KEYS if k not in r][:1]
    if missing:
        raise ArtifactError(f"{path / 'siftc.json'} has a report without {missing[0]!r}: corrupt or "
                            f"from another tool; convert the model again")


def load(path: str | os.PathLike, model=None):
    """Rebuild a converted model from an artifact directory.

    `model` is needed only when the artifact was converted from an in-memory model: pass a fresh
    instance of the same dense model. Returns the GraphModule, with `siftc_info` set.
    """
    from siftc.convert import convert_module

    path = Path(path)
    meta = read_meta(path)
    state, inputs = _tensors(path)
    try:
        cfg = ConvertConfig.from_json(meta["config"])
        source = Source(**meta["source"]) if meta.get("source") else None
    except (TypeError, SiftcError) as e:
        raise ArtifactError(f"{path / 'siftc.json'} has a corrupt config or source ({e}); "
                            f"convert the model again") from e
    warnings = []
    if model is None:
        if source is None:
            raise ArtifactError(f"{path} was converted from an in-memory model; pass model=<a fresh "
                                f"instance of the dense model> to siftc.load")
        model, changed = _rebuild_dense(path, source)
        if changed:
            warnings.append(f"{source.path} changed since conversion; the structure still has to match")
    gm = convert_module(model, inputs, cfg, source)
    try:
        gm.load_state_dict(unpack_state(state, path), strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise ArtifactError(f"{path} does not match the model it names ({first}); "
                            f"the model file changed or the artifact is from another model") from e
    gm.siftc_info.warnings.extend(warnings)
    gm.siftc_info.report = meta["report"]
    return gm


VALUES, BITS, SHAPE = "weight@values", "mask@bits", "mask@shape"
SHAPE_KEY = "weight_shape"  # a sparse layer's dense shape, in its state dict


def pack_state(state: dict) -> dict:
    """A state dict with each sparse layer's `<name>.positions` stored as the bits of its mask (1 bit per
    dense entry: at 90% sparsity 1.25 bits per non-zero, against 32 for the positions) and its shape, and
    its `<name>.values` (row-major, the order of the positions) as `<name>.weight@values`."""
    out = dict(state)
    for key in [k for k in state if k.rpartition(".")[2] == "positions"]:
        prefix = key[: -len("positions")]
        values, shape = out.pop(prefix + "values", None), out.pop(prefix + SHAPE_KEY, None)
        if values is None or shape is None:
            continue  # not a sparse layer's
        out.pop(key)
        mask = np.zeros(int(shape.prod()), dtype=bool)
        mask[state[key].numpy()] = True
        out[prefix + BITS] = torch.from_numpy(np.packbits(mask))
        out[prefix + SHAPE] = shape.clone()
        out[prefix + VALUES] = values.clone()
    return out


def unpack_state(packed: dict, path: Path) -> dict:
    """A model's state dict back from `pack_state`'s form (values + positions per sparse layer)."""
    state = {k: v for k, v in packed.items() if not k.endswith((VALUES, BITS, SHAPE))}
    for key in packed:
        if not key.endswith(BITS):
            continue
        prefix = key[: -len(BITS)]
        values, shape, bits = packed.get(prefix + VALUES), packed.get(prefix + SHAPE), packed[key].numpy()
        if values is None or shape is None or bits.dtype != np.uint8 or bits.size * 8 < int(shape.prod()):
            raise ArtifactError(f"{path} stores an incomplete sparse weight for {prefix}weight: corrupt; "
                                f"convert the model again")
        positions = np.flatnonzero(np.unpackbits(bits, count=int(shape.prod())))
        if positions.size != values.numel():
            raise ArtifactError(f"{path} holds {values.numel()} values for {prefix}weight but its mask has "
                                f"{positions.size}: corrupt; convert the model again")
        state[prefix + "positions"] = torch.from_numpy(positions.astype(np.int32))
        state[prefix + "values"] = values
        state[prefix + SHAPE_KEY] = shape
    return state


def read_state(path: str | os.PathLike) -> dict:
    """The artifact's full state dict (dense-shaped weights and masks), without rebuilding the model."""
    path = Path(path)
    read_meta(path)
    return unpack_state(_tensors(path)[0], path)


def _tensors(path: Path) -> tuple[dict, tuple]:
    """weights.pt and inputs.pt, unpickled with weights_only=True: tensors and containers, never code."""
    try:
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
        inputs = torch.load(path / "inputs.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"cannot read tensors of {path}: {str(e).splitlines()[0]}; convert again") from e
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()) or \
            not isinstance(inputs, list) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ArtifactError(f"{path} holds something other than tensors in weights.pt or inputs.pt; "
                            f"convert the model again")
    return state, tuple(inputs)


def _rebuild_dense(path: Path, source: Source):
    """A fresh dense model from the file the artifact names (by its absolute path, so any working
    directory will do), and whether that file changed since conversion."""
    try:
        loaded = load_model(source.absolute, inputs=False)  # the inputs come from inputs.pt
    except SiftcError as e:
        raise ArtifactError(f"{path} was converted from {source.absolute}, which cannot be loaded now ({e}); "
                            f"restore that file or convert again") from e
    return loaded.model, source.changed(loaded.source)
