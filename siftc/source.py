"""Sources: what a model comes from, resolved to the model, example inputs to run it on, and provenance.

A source is a `model.py[:factory]` / `pkg.module:factory` spec, an artifact directory, or a model
returned by siftc.convert / siftc.load. Naming follows uvicorn: `path/to/model.py:build` or
`pkg.module:build`, where `build` is a callable returning an nn.Module (or an nn.Module attribute),
called with the keyword arguments of `--model-arg key=value` (`parse_model_args`).
Without `:name` siftc takes the one obvious factory, or says what it found. Example inputs come from
`example_inputs_<factory>()` or `example_inputs()` in the same file, or from an explicit shape
(`--input-shape 1,3,224,224`). Importing a model file runs its code: that is the contract of naming one.
"""
import ast
import base64
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import io
import math
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from siftc.errors import ModelLoadError, UsageError
from siftc.store import file_sha256

FACTORY_NAMES = ("build", "model", "make_model", "create_model", "get_model")
SEED = 0  # torch seed while `resolve` builds a model.py's dense model, so a rebuild gets the same weights


@dataclass
class Source:
    """Where a model came from, so an artifact can rebuild it."""
    spec: str                  # as the user wrote it, with the factory resolved: "examples/mlp.py:mlp"
    path: str | None = None    # absolute path of the file, when it is one
    sha256: str | None = None  # of that file, to notice edits after conversion
    model_args: dict | None = None  # keyword arguments the factory was called with (--model-arg)

    def to_json(self):
        return {"spec": self.spec, "path": self.path, "sha256": self.sha256, "model_args": self.model_args}

    @property
    def absolute(self) -> str:
        """The spec with the file's absolute path, so any working directory will do."""
        return f"{self.path}:{self.spec.rpartition(':')[2]}" if self.path else self.spec

    def changed(self, now: "Source") -> bool:
        """Whether the file was edited since this was recorded (as far as its hash tells)."""
        return bool(self.sha256) and now.sha256 != self.sha256


@dataclass
class LoadedModel:
    """A source resolved: what export, bench's torch engine and the API run."""
    model: nn.Module
    example_inputs: tuple
    source: Source | None       # what an artifact records to rebuild the model; None if converted from
                                # an nn.Module rather than a spec
    origin: dict                # for an export's sidecar: {"type": "model" | "artifact" | "in-memory", ...}
    report: dict | None = None  # the conversion report, when the model is a converted one


def resolve(source) -> LoadedModel:
    """An artifact directory, a "model.py[:factory]" spec (the dense baseline, built under SEED), or a
    model returned by siftc.convert / siftc.load."""
    if isinstance(source, nn.Module):
        info = getattr(source, "siftc_info", None)
        if info is None:
            raise UsageError("export takes a model from siftc.convert/siftc.load, an artifact directory "
                             "or a 'model.py[:factory]' spec; for a plain nn.Module pass its spec")
        origin = {"type": "in-memory", "converted_from": info.source.spec if info.source else None}
        return LoadedModel(source, tuple(info.example_inputs), info.source, origin, info.report)
    text = str(source)
    path = Path(text)
    if path.is_dir():
        from siftc.artifact import load
        gm = load(path)  # checks the artifact (and its checksums) once
        info = gm.siftc_info
        origin = {"type": "artifact", "path": str(path.resolve()),
                  "model": info.source.to_json() if info.source else None}
        return LoadedModel(gm, tuple(info.example_inputs), info.source, origin, info.report)
    file_part = text.partition(":")[0]
    if not Path(file_part).exists() and (file_part.endswith(".py") or "/" in file_part):
        raise UsageError(f"{text} not found; pass an artifact directory (siftc convert -o) or model.py[:factory]")
    if Path(file_part).is_file() and Path(file_part).suffix != ".py":
        raise UsageError(f"{file_part} is neither an artifact directory nor a model.py; pass what siftc convert -o "
                         f"wrote, or the dense model.py[:factory]")
    with torch.random.fork_rng():
        torch.manual_seed(SEED)  # the dense baseline's weights are its factory's init: make them reproducible
        loaded = load_model(text)
    loaded.origin["seed"] = SEED
    return loaded


# ------------------------------------------------------------------------------------------ inputs

def input_specs(example_inputs: tuple, names: list[str], batch) -> list[dict]:
    """What it takes to make valid inputs without the examples (bench reads these from the sidecar):
    name, shape (dim 0 is `batch`, "batch" if dynamic), dtype, the range of integer inputs (token ids),
    and a boolean input's first example item, packed (a mask's pattern cannot be drawn at random)."""
    specs = []
    for name, x in zip(names, example_inputs):
        spec = {"name": name, "shape": [batch, *x.shape[1:]], "dtype": str(x.dtype).removeprefix("torch.")}
        if x.dtype == torch.bool:
            spec["bits"] = base64.b64encode(np.packbits(x[:1].numpy().ravel()).tobytes()).decode()
        elif not x.dtype.is_floating_point:
            spec["low"], spec["high"] = int(x.min()), int(x.max())
        specs.append(spec)
    return specs


def make_inputs(like, batch: int, seed: int = 0) -> tuple:
    """Tensors like `like` (example tensors, or `input_specs` records) with batch `batch` on dim 0:
    floats ~ N(0, 1), integers (token ids) uniform over the example's range, booleans the example's
    first item repeated (all True for a spec that does not carry it)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in like:
        if isinstance(x, torch.Tensor):
            x = input_specs((x,), [""], 1)[0]
        shape, dtype = (batch, *x["shape"][1:]), getattr(torch, x["dtype"])
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g, dtype=dtype))
        elif dtype == torch.bool:
            out.append(_first_item(x).expand(shape).clone() if "bits" in x else torch.ones(shape, dtype=dtype))
        else:
            out.append(torch.randint(x.get("low", 0), x.get("high", 0) + 1, shape, generator=g, dtype=dtype))
    return tuple(out)


def _first_item(spec: dict) -> torch.Tensor:
    """A boolean spec's packed first example item, as a (1, ...) tensor."""
    item = (1, *spec["shape"][1:])
    bits = np.frombuffer(base64.b64decode(spec["bits"]), dtype=np.uint8)
    return torch.from_numpy(np.unpackbits(bits, count=math.prod(item)).astype(bool)).view(item)


# ------------------------------------------------------------------------------------------ model.py

GUARD = 'guard its script code with `if __name__ == "__main__":`'


def _import(target: str):
    """Import a .py path or a dotted module name; returns (module, file path or None)."""
    dotted = all(part.isidentifier() for part in target.split("."))  # torch.nn, pkg.models
    if target.endswith(".py") or "/" in target or not dotted or Path(target).is_file():
        path = Path(target)
        if not path.is_file():
            raise ModelLoadError(f"model file {target} not found; pass a path like examples/mlp.py[:factory]")
        name = "siftc_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up here
        sys.path.insert(0, str(path.resolve().parent))
        try:
            _as_script(lambda: spec.loader.exec_module(module), f"importing {target}", path, GUARD)
        except ModelLoadError:
            sys.modules.pop(name, None)
            raise
        except Exception as e:
            sys.modules.pop(name, None)
            raise ModelLoadError(f"importing {target} failed: {type(e).__name__}: {e} "
                                 f"({_where(e, path)}); fix the file or run with --debug") from e
        finally:
            sys.path.remove(str(path.resolve().parent))
        return module, path.resolve()
    try:
        return _as_script(lambda: importlib.import_module(target), f"importing {target}", None, GUARD), None
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot import module {target!r}: {type(e).__name__}: {e}; "
                             f"pass a file path (model.py) or an importable module") from e


def _as_script(call, what: str, path: Path | None, fix: str):
    """`call()` (the user's model code) as it would run under `python path`: sys.argv is [path], so
    an argparse at import sees none of siftc's options. A sys.exit inside is the model file's, reported
    as one ModelLoadError naming the file and line and the last line it printed (argparse's reason);
    what it printed to stderr is passed on when it does not exit."""
    argv, printed, exited = sys.argv, io.StringIO(), False
    sys.argv = [str(path if path is not None else what.removeprefix("importing "))]
    try:
        with contextlib.redirect_stderr(printed):
            return call()
    except SystemExit as e:
        exited = True
        code = "" if e.code is None else repr(e.code)[:80]
        said = [line.strip() for line in printed.getvalue().splitlines() if line.strip()]
        after = f', after printing "{said[-1][:200]}"' if said else ""
        raise ModelLoadError(f"{what} exited (sys.exit({code}) at {_where(e, path)}{after}): the model "
                             f"file's doing; {fix}") from e
    finally:
        sys.argv = argv
        if not exited and printed.getvalue():
            sys.stderr.write(printed.getvalue())


def _where(exc: BaseException, path: Path | None = None) -> str:
    """file:line of the innermost frame in `path` (or the innermost frame) of an exception."""
    frames = traceback.extract_tb(exc.__traceback__)
    if path is not None:
        frames = [f for f in frames if Path(f.filename).resolve() == path.resolve()] or frames
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}"


def _candidates(module) -> list[str]:
    """Obvious factories: a conventional name, else nn.Module instances, else zero-arg functions
    defined in the file itself."""
    names = [n for n in FACTORY_NAMES if callable(getattr(module, n, None))]
    if names:
        return names[:1]
    instances = [n for n, v in vars(module).items() if isinstance(v, nn.Module) and not n.startswith("_")]
    if instances:
        return instances
    funcs = []
    for n, v in vars(module).items():
        if n.startswith("_") or n.startswith("example_inputs") or not inspect.isfunction(v):
            continue
        if v.__module__ != module.__name__:
            continue
        params = inspect.signature(v).parameters.values()
        if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            funcs.append(n)
    return funcs


def load_model(spec: str, input_shape: tuple[int, ...] | None = None, inputs: bool = True,
               model_args: dict | None = None) -> LoadedModel:
    """Load `spec` ("model.py[:factory]" or "pkg.module:factory") into a model and example inputs
    (none with inputs=False: an artifact brings its own). `model_args`: keyword arguments for the
    factory."""
    target, _, name = spec.partition(":") if not spec.startswith(":") else (spec, "", "")
    module, path = _import(target)
    if not name:
        found = _candidates(module)
        if len(found) != 1:
            why = f"several candidate factories ({', '.join(found)})" if found else "no factory"
            raise ModelLoadError(f"{target} has {why}; name one as {target}:<factory>, "
                                 f"a function returning an nn.Module")
        name = found[0]
    if not hasattr(module, name):
        raise ModelLoadError(f"{target} has no attribute {name!r}; available: "
                             f"{', '.join(_candidates(module)) or 'no obvious factory'}")
    obj = getattr(module, name)
    if isinstance(obj, nn.Module) and model_args:
        raise UsageError(f"{target}:{name} is a model instance, which takes no --model-arg; name a factory "
                         f"(a function or class returning an nn.Module)")
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        _check_takes(obj, model_args or {}, f"{target}:{name}")
        try:
            model = _as_script(lambda: obj(**(model_args or {})), f"factory {target}:{name}", path,
                               "a factory returns an nn.Module; leave exiting to the script code")
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"factory {target}:{name} raised {type(e).__name__}: {e} "
                                 f"({_where(e, path)}); fix it or run with --debug") from e
    else:
        raise ModelLoadError(f"{target}:{name} is a {type(obj).__name__}, not a factory; "
                             f"name a function returning an nn.Module")
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"factory {target}:{name} returned a {type(model).__name__}, not an nn.Module")
    example = _example_inputs(module, name, target, input_shape) if inputs else ()
    source = Source(f"{target}:{name}", str(path) if path else None, file_sha256(path) if path else None,
                    dict(model_args) if model_args else None)
    return LoadedModel(model, example, source, {"type": "model", **source.to_json()})


def _check_takes(factory, args: dict, where: str):
    """Each of `args` names a parameter of `factory` (or it takes **kwargs)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in args:
        if key not in named:
            takes = f"it takes {', '.join(named)}" if named else "it takes no arguments"
            raise UsageError(f"--model-arg {key}: factory {where} has no parameter {key!r} ({takes}); pass "
                             f"what it takes, or name a factory that takes {key}")


def _example_inputs(module, factory: str, target: str, input_shape) -> tuple | dict:
    """A tuple of positional inputs, or a dict of keyword inputs (an HF model: {"input_ids": ...})."""
    if input_shape is not None:
        return (torch.randn(*input_shape),)
    for fn_name in (f"example_inputs_{factory}", "example_inputs"):
        fn = getattr(module, fn_name, None)
        if callable(fn):
            try:
                out = fn()
            except Exception as e:
                raise ModelLoadError(f"{target}:{fn_name}() raised {type(e).__name__}: {e}") from e
            if isinstance(out, dict):
                if not any(isinstance(t, torch.Tensor) for t in out.values()):
                    raise ModelLoadError(f"{target}:{fn_name}() returned a dict without tensors; map forward "
                                         f"argument names to tensors, e.g. {{'input_ids': ...}}")
                return out
            out = out if isinstance(out, tuple) else (out,)
            if not all(isinstance(t, torch.Tensor) for t in out):
                raise ModelLoadError(f"{target}:{fn_name}() must return a tensor, a tuple of tensors or a "
                                     f"dict of keyword inputs")
            return out
    raise UsageError(f"{target} defines no example_inputs(); add one to the file or pass "
                     f"--input-shape, e.g. --input-shape 1,3,32,32")


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(t) for t in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r} is not a shape; write positive integers like 1,3,224,224")
    return shape


def parse_model_args(items) -> dict:
    """['hidden=128', 'name=tiny', 'dims=(64, 32)'] -> {'hidden': 128, 'name': 'tiny', 'dims': (64, 32)}:
    each value a Python literal (ast.literal_eval), else the text itself as a string."""
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise UsageError(f"--model-arg {item!r} is not key=value with a Python name as key; "
                             f"e.g. --model-arg hidden=128")
        if key in out:
            raise UsageError(f"--model-arg {key} is given twice; pass each argument once")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = text  # a bare word: hidden_act=gelu
        out[key] = value
    check_model_args(out)
    return out


def check_model_args(args: dict):
    """Model arguments are recorded in the artifact's JSON: only JSON-like values (a tuple becomes a list)."""
    for key, value in args.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise UsageError(f"model argument {key!r} is not a Python name; pass keyword arguments")
        bad = _unrecordable(value)
        if bad is not None:
            raise UsageError(f"model argument {key}={value!r}: {bad!r} cannot be recorded in the artifact; pass "
                             f"numbers, strings, booleans, None, and lists or dicts (string keys) of them")


def _unrecordable(v):
    """The first value in `v` that JSON cannot hold (a set, bytes, inf, a non-string dict key), or None."""
    if isinstance(v, float):
        return None if math.isfinite(v) else v
    if v is None or isinstance(v, (bool, int, str)):
        return None
    if isinstance(v, dict):
        keys = [k for k in v if not isinstance(k, str)]
        return keys[0] if keys else next((b for b in map(_unrecordable, v.values()) if b is not None), None)
    if isinstance(v, (list, tuple)):
        return next((b for b in map(_unrecordable, v) if b is not None), None)
    return v
