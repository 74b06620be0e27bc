"""A converted model on disk: a directory with

    siftc.json   format tag, source (model spec + file hash: provenance), config, report, notes (what
                 was stored other than as it was: an output class kept as a dict), checksums of the
                 other files, and `digest`, the sha256 of the rest of siftc.json (an edit is refused)
    graph.json   the GraphModule as data: nodes (targets by qualified name) and the module tree
                 (classes with constructor arguments), siftc.graph_data; absent when the model needs
                 its source (`needs_source` in siftc.json says why)
    weights.pt   the state dict (weights, masks, norm statistics); a sparse layer's weight is stored as
                 its values inside the mask (`<name>.weight@values`) and its mask as bits
                 (`<name>.mask@bits`), so a 90% Sparse Wide ResNet-18 takes 59 MB, not 558 MB
    inputs.pt    the example inputs the conversion traced with

Loading runs no code but siftc's and torch's: tensors come back through `torch.load(weights_only=True)`,
the rest is JSON, and the module structure is built from graph.json by siftc.graph_data, which builds
and calls only what its allow-list names. A model that cannot be stored so (a user's --leaf module), and
a version-2 artifact, load only with trust_source=True: that imports the recorded model file and
re-runs the same (seeded, deterministic) conversion. Writing goes to a temporary directory renamed into
place, so a failed save leaves nothing half-written (siftc.store.write_dir).
"""
import contextlib
import contextvars
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from siftc import graph_data
from siftc.config import ConvertConfig
from siftc.errors import ArtifactError, SiftcError, UsageError
from siftc.source import Source, load_model
from siftc.store import file_sha256, os_errors, verify_digest, write_dir

FORMAT = "siftc-artifact"
VERSION = 3  # 2: sparse layers stored as values inside the mask + mask bits; 3: graph.json, digest
FILES = ("siftc.json", "weights.pt", "inputs.pt")
GRAPH = "graph.json"
CONSTANT = "constant@"  # weights.pt key prefix of a tensor the graph reads that is not in the state dict
# What `trust_source=None` means: the CLI's --trust-source sets it around a command (train, export),
# so the library calls below it need no new argument.
_TRUST = contextvars.ContextVar("siftc_trust_source", default=False)


def trusted() -> bool:
    """Whether the code running now may import model files (inside `trusting`, the CLI's --trust-source)."""
    return _TRUST.get()


@contextlib.contextmanager
def trusting(trust: bool = True):
    """Inside, siftc.load may import an artifact's model file (as trust_source=True)."""
    token = _TRUST.set(bool(trust))
    try:
        yield
    finally:
        _TRUST.reset(token)


def save(gm, out: str | os.PathLike, force: bool = False, inputs=()) -> Path:
    """Save a model returned by `siftc.convert` as an artifact directory. `force` replaces an existing
    artifact only (never `inputs`, the files the command read; see siftc.store.check_output)."""
    info = getattr(gm, "siftc_info", None)
    if info is None:
        raise UsageError("this model was not produced by siftc.convert; convert it first")

    try:
        data, constants, notes = graph_data.to_data(gm)
        needs_source = None
        _check_data(gm, data, constants, notes)
    except graph_data.NotData as e:
        data, constants, notes, needs_source = None, {}, [], str(e)

    def fill(tmp: Path):
        torch.save({**pack_state(gm.state_dict()), **{CONSTANT + k: v for k, v in constants.items()}},
                   tmp / "weights.pt")
        torch.save(list(info.example_inputs), tmp / "inputs.pt")
        if data is not None:
            (tmp / GRAPH).write_text(json.dumps(data))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "source": info.source.to_json() if info.source else None,
            "needs_source": needs_source,
            "notes": notes,
            "config": info.config.to_json(),
            "report": info.report,
            "sha256": {f: file_sha256(tmp / f) for f in ("weights.pt", "inputs.pt", GRAPH) if (tmp / f).exists()},
        }
        write_meta(tmp, meta)

    source = info.source.path if info.source else None
    return write_dir(Path(out), force, fill, want=FORMAT, inputs=(*inputs, source))


def _check_data(gm, data: dict, constants: dict, notes: list):
    """The model rebuilt from `data` has gm's state keys, shapes and module classes, and its input and
    output structure (the same, or with a note, as plain containers) (NotData if not)."""
    try:
        new = graph_data.from_data(json.loads(json.dumps(data)), constants)
    except graph_data.Refused as e:
        raise graph_data.NotData(str(e)) from None
    mine, theirs = gm.state_dict(), new.state_dict()
    classes = {n: type(m) for n, m in gm.named_modules() if n} != {n: type(m) for n, m in new.named_modules() if n}
    if classes or list(mine) != list(theirs) or any(mine[k].shape != theirs[k].shape for k in mine
                                                    if not k.endswith(("values", "positions"))):
        raise graph_data.NotData("the module tree rebuilt from its data differs from the model's")
    old_cg, new_cg = gm.graph._codegen, new.graph._codegen
    same = type(old_cg) is type(new_cg) and (notes or getattr(old_cg, "pytree_info", None) ==
                                             getattr(new_cg, "pytree_info", None))
    if not same or graph_data.codegen_data(new_cg, []) != data["codegen"]:
        raise graph_data.NotData("the input and output structure rebuilt from its data differs from the model's")


def meta_digest(meta: dict) -> str:
    """sha256 of siftc.json's content without its `digest` (keys sorted, no spaces)."""
    rest = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_meta(directory: Path, meta: dict):
    """Write siftc.json with its digest."""
    (Path(directory) / "siftc.json").write_text(json.dumps({**meta, "digest": meta_digest(meta)}, indent=1))


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
    if meta.get("version") not in (2, VERSION):
        raise ArtifactError(f"{path} has artifact version {meta.get('version')}, this siftc reads "
                            f"2 and {VERSION}; convert the model again with this siftc")
    for key in ("config", "report", "sha256"):
        if not isinstance(meta.get(key), dict):
            raise ArtifactError(f"{path / 'siftc.json'} lacks {key!r}: truncated or corrupt; convert again")
    _check_report(path, meta["report"])
    files = {*FILES[1:], GRAPH} if meta["version"] == VERSION and not meta.get("needs_source") else set(FILES[1:])
    if set(meta["sha256"]) != files or not all(isinstance(d, str) for d in meta["sha256"].values()):
        raise ArtifactError(f"{path / 'siftc.json'} has no checksums of {', '.join(sorted(files))}: "
                            f"corrupt; convert the model again")
    if meta["version"] == VERSION and meta.get("digest") != meta_digest(meta):
        raise ArtifactError(f"{path / 'siftc.json'} was edited after it was written (its digest does not "
                            f"match); convert the model again")
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


def load(path: str | os.PathLike, model=None, trust_source: bool | None = None):
    """Rebuild a converted model from an artifact directory. Returns the GraphModule, with `siftc_info`.

    A version-3 artifact is built from its graph.json, running no code but siftc's and torch's; one
    that names anything outside siftc.graph_data's allow-list is refused. `trust_source=True` (None:
    as set by `trusting`, the CLI's --trust-source) instead imports the recorded model file and runs
    the conversion again: what an artifact that needs its source (a user's --leaf module) and a
    version-2 artifact require. `model`: a fresh instance of the dense model, for an artifact converted
    from an in-memory model that cannot be built from data.
    """
    path = Path(path)
    meta = read_meta(path)
    state, inputs = _tensors(path)
    try:
        cfg = ConvertConfig.from_json(meta["config"])
        source = Source(**meta["source"]) if meta.get("source") else None
    except (TypeError, SiftcError) as e:
        raise ArtifactError(f"{path / 'siftc.json'} has a corrupt config or source ({e}); "
                            f"convert the model again") from e
    trust = _TRUST.get() if trust_source is None else trust_source
    constants = {k[len(CONSTANT):]: state.pop(k) for k in [k for k in state if k.startswith(CONSTANT)]}
    why = _why_source(path, meta, source, cfg)
    if why is None:
        try:
            gm = graph_data.from_data(_read_graph(path), constants)
        except graph_data.Refused as e:
            if not trust:
                raise ArtifactError(f"{path / GRAPH} {e}: refused, nothing was run; convert the model "
                                    f"again (or pass --trust-source to rebuild it from its model file)") from e
            why = str(e)
        else:
            _load_state(gm, state, path)
            from siftc.convert import ConversionInfo
            gm.siftc_info = ConversionInfo(cfg, meta["report"], inputs, source)
            return gm
    if not trust and model is None:
        raise ArtifactError(f"{path} {why}; pass trust_source=True (--trust-source) to import and run "
                            f"{source.absolute if source else 'the model'}, if you trust it")
    return _reconvert(path, meta, cfg, source, model, state, inputs)


def _why_source(path: Path, meta: dict, source: Source | None, cfg: ConvertConfig) -> str | None:
    """Why the artifact can only be rebuilt from its model file, or None when it is stored as data."""
    if meta["version"] == VERSION and not meta.get("needs_source"):
        return None
    if meta["version"] == VERSION:
        return f"needs its model file to load: {meta['needs_source']}"
    again = f"siftc convert {source.spec} --kind {cfg.kind} --sparsity {cfg.sparsity:g} -o NEW" if source else \
        "convert it again with this siftc"
    return f"is a version-2 artifact, which loads only by importing its model file (or re-convert: {again})"


def _read_graph(path: Path) -> dict:
    try:
        with os_errors(path / GRAPH, "read"):
            return json.loads((path / GRAPH).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path / GRAPH} is corrupt ({e}); convert the model again") from e


def _load_state(gm, state: dict, path: Path):
    """The stored tensors become the model's (assigned, not copied: a model built from graph.json holds
    meta tensors, and a parameter keeps its stored dtype)."""
    try:
        gm.load_state_dict(unpack_state(state, path), strict=True, assign=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise ArtifactError(f"{path} does not match the model it names ({first}); "
                            f"the model file changed or the artifact is from another model") from e
    empty = next((n for n, t in (*gm.named_parameters(), *gm.named_buffers()) if t.is_meta), None)
    if empty is not None:
        raise ArtifactError(f"{path} holds no tensor for {empty}: corrupt or from another siftc; convert again")
    _tie(gm)


def _tie(gm):
    """Parameters saved as one tensor (tied weights: a state dict names a shared parameter once per
    owner, and torch.save keeps it one storage) are one Parameter again, not two that share memory,
    which an optimizer would step twice."""
    first = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        key = (p.data_ptr(), p.storage_offset(), tuple(p.shape), tuple(p.stride()), p.dtype)
        if p.numel() and first.setdefault(key, p) is not p:
            owner, _, atom = name.rpartition(".")
            gm.get_submodule(owner)._parameters[atom] = first[key]


def _reconvert(path: Path, meta: dict, cfg: ConvertConfig, source: Source | None, model, state, inputs):
    """The trusted way: import the recorded model file (unchanged since conversion) and convert again."""
    from siftc.convert import convert_module

    if model is None:
        if source is None:
            raise ArtifactError(f"{path} was converted from an in-memory model; pass model=<a fresh "
                                f"instance of the dense model> to siftc.load")
        model, changed = _rebuild_dense(path, source)
        if changed:
            raise ArtifactError(f"{source.path} changed since {path} was converted from it (sha256 differs); "
                                f"restore that file or convert again")
    gm = convert_module(model, inputs, cfg, source)
    _load_state(gm, state, path)
    gm.siftc_info.report = meta["report"]
    return gm


VALUES, BITS, SHAPE = "weight@values", "mask@bits", "mask@shape"
GAPS, FAR = "mask@gaps", "mask@far"
SHAPE_KEY = "weight_shape"  # a sparse layer's dense shape, in its state dict
FAR_GAP = 255  # a gap of 255 or more is stored as 255, its size in `@far`


def pack_state(state: dict) -> dict:
    """A state dict with each sparse layer's `<name>.positions` stored compactly with its shape, and its
    `<name>.values` (row-major, the order of the positions) as `<name>.weight@values`. The positions
    are the bits of the mask (`@bits`, 1 bit per dense entry) when the layer is at least 1/8 dense, and
    else the gaps between them (`@gaps`, a byte per non-zero; a gap of 255 or more also in `@far`): at
    90% sparsity 8 bits a non-zero against 10 for the bits and 32 for the positions, and decoded with a
    cumulative sum over the non-zeros, not a scan of every dense entry (siftc.load's time)."""
    out = dict(state)
    for key in [k for k in state if k.rpartition(".")[2] == "positions"]:
        prefix = key[: -len("positions")]
        values, shape = out.pop(prefix + "values", None), out.pop(prefix + SHAPE_KEY, None)
        if values is None or shape is None:
            continue  # not a sparse layer's
        out.pop(key)
        positions, numel = state[key].numpy(), int(shape.prod())  # int32, ascending
        if 8 * positions.size >= numel:
            mask = np.zeros(numel, dtype=bool)
            mask[positions] = True
            out[prefix + BITS] = torch.from_numpy(np.packbits(mask))
        else:
            gaps = np.diff(positions, prepend=np.int32(-1))
            gaps -= 1
            out[prefix + GAPS] = torch.from_numpy(np.minimum(gaps, FAR_GAP).astype(np.uint8))
            out[prefix + FAR] = torch.from_numpy(gaps[gaps >= FAR_GAP].astype(np.int32))
        out[prefix + SHAPE] = shape
        out[prefix + VALUES] = values
    return out


def unpack_state(packed: dict, path: Path) -> dict:
    """A model's state dict back from `pack_state`'s form (values + positions per sparse layer)."""
    state = {k: v for k, v in packed.items() if not k.endswith((VALUES, BITS, SHAPE, GAPS, FAR))}
    for key in packed:
        if not key.endswith((BITS, GAPS)):
            continue
        prefix = key[: -len(BITS if key.endswith(BITS) else GAPS)]
        values, shape = packed.get(prefix + VALUES), packed.get(prefix + SHAPE)
        if values is None or shape is None or shape.dtype != torch.int64 or shape.dim() != 1:
            raise ArtifactError(f"{path} stores an incomplete sparse weight for {prefix}weight: corrupt; "
                                f"convert the model again")
        numel = int(shape.prod())
        positions = _from_bits(packed[key], numel) if key.endswith(BITS) else \
            _from_gaps(packed[key], packed.get(prefix + FAR), numel)
        if positions is None or positions.size != values.numel() or \
                (positions.size and not 0 <= positions[0] <= positions[-1] < numel):
            raise ArtifactError(f"{path} holds {values.numel()} values for {prefix}weight but its mask does not "
                                f"fit them: corrupt; convert the model again")
        state[prefix + "positions"] = torch.from_numpy(positions.astype(np.int32, copy=False))
        state[prefix + "values"] = values
        state[prefix + SHAPE_KEY] = shape
    return state


def _from_bits(bits: torch.Tensor, numel: int) -> np.ndarray | None:
    bits = bits.numpy()
    if bits.dtype != np.uint8 or bits.size * 8 < numel:
        return None
    return np.flatnonzero(np.unpackbits(bits, count=numel).view(bool))


def _from_gaps(gaps: torch.Tensor, far: torch.Tensor | None, numel: int) -> np.ndarray | None:
    """int32 positions from their gaps: ascending by construction (every step is at least 1), summed
    in int32 once the total is known to fit the layer."""
    if far is None or gaps.dtype != torch.uint8 or far.dtype != torch.int32 or gaps.dim() != 1:
        return None
    steps = gaps.numpy().astype(np.int32)
    at = steps == FAR_GAP
    if int(at.sum()) != far.numel() or (far < FAR_GAP).any():
        return None
    steps[at] = far.numpy()
    steps += 1
    if int(steps.sum(dtype=np.int64)) > numel:
        return None
    positions = np.cumsum(steps, dtype=np.int32)
    positions -= 1
    return positions


def read_state(path: str | os.PathLike) -> dict:
    """The artifact's full state dict (dense-shaped weights and masks), without rebuilding the model."""
    path = Path(path)
    read_meta(path)
    state = {k: v for k, v in _tensors(path)[0].items() if not k.startswith(CONSTANT)}
    return unpack_state(state, path)


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
        loaded = load_model(source.absolute, inputs=False,  # the inputs come from inputs.pt
                            model_args=source.model_args)
    except SiftcError as e:
        raise ArtifactError(f"{path} was converted from {source.absolute}, which cannot be loaded now ({e}); "
                            f"restore that file or convert again") from e
    return loaded.model, source.changed(loaded.source)
