"""`--config run.yaml|run.json`: a command's settings from a file, under the names of its flags.

    method: rigl            # a flag's name, with - or _ (batch-size or batch_size)
    steps: 2000
    output: runs/mlp        # or out, as run.json says; artifact and data: ARTIFACT and --data
    lr: 3.0e-3              # YAML 1.1 (PyYAML) reads 3e-3 without the dot as a string

The run.json that `siftc train` writes is valid input (its "config" holds the run's settings). The file's
values become the command's defaults, so flags given on the command line override them. An unknown key or
a value of the wrong type is a one-line error naming the key and the file.
"""
import difflib
import json
from pathlib import Path

import click

from siftc.errors import UsageError
from siftc.store import os_errors
from siftc.train.checkpoint import RUN_FORMAT

NOT_IN_FILES = ("config", "resume")  # a file cannot name another file, nor a run to continue
ALIASES = {"out": "output"}          # run.json's name -> the flag's


def option(f):
    """--config FILE on a click command: the file's settings become the command's defaults."""
    return click.option("--config", type=click.Path(), is_eager=True, callback=_load, metavar="FILE",
                        help="Settings from a .json or .yaml file, keys named as the flags (batch_size or "
                             "batch-size); flags given here override it. A run's run.json works: "
                             "--config runs/a/run.json -o runs/b --seed 1.")(f)


def _load(ctx: click.Context, param, value):
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **defaults(value, ctx.command)}
    return value


def defaults(path, command: click.Command) -> dict:
    """The settings in `path` as `command`'s default_map (parameter name -> value), each checked
    against its parameter's type."""
    params = {p.name: p for p in command.params if p.name not in NOT_IN_FILES}
    out = {}
    for key, value in read(path).items():
        name = ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name not in params:
            close = difflib.get_close_matches(name, params, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"{path}: unknown key {key!r}; {hint}the keys are {command.name}'s flags: "
                             f"{', '.join(sorted(params))}")
        out[name] = _checked(path, key, value, params[name])
    return out


def read(path) -> dict:
    """The mapping in `path` (.json, .yaml or .yml); of a run.json, its "config"."""
    path = Path(path)
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise UsageError(f"--config {path}: expected a .json, .yaml or .yml file")
    if not path.is_file():
        raise UsageError(f"--config {path}: {'is a directory' if path.is_dir() else 'not found'}; pass a "
                         f".json or .yaml file of settings (a run's run.json works)")
    with os_errors(path, "read"):
        text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from e
    else:
        data = _yaml(path, text)
    if isinstance(data, dict) and data.get("format") == RUN_FORMAT:
        data = data.get("config")
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds {type(data).__name__}, not a mapping of settings (key: value)")
    return data


def _yaml(path: Path, text: str):
    try:
        import yaml
    except ImportError:
        raise UsageError(f"reading {path} needs PyYAML, which is not installed here: pip install pyyaml "
                         f"(or write the settings as .json)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise UsageError(f"{path} is not valid YAML ({where}{getattr(e, 'problem', None) or e})") from e


def _checked(path, key, value, param: click.Parameter):
    """`value` if it fits `param`'s type (a float may be written as an integer); else a UsageError."""
    t = param.type
    if value is None:
        if param.default is None and not getattr(param, "is_flag", False):
            return None  # unset, as run.json writes an option not given
        raise UsageError(f"{path}: {key} is null; give it a value or leave the key out")
    if getattr(param, "is_flag", False) or isinstance(t, click.types.BoolParamType):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(t, click.types.IntParamType):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(t, click.types.FloatParamType):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif isinstance(t, click.Choice):
        ok, want = value in t.choices, f"one of {', '.join(map(str, t.choices))}"
    elif isinstance(t, (click.Path, click.types.StringParamType)):
        ok, want = isinstance(value, str), "a string"
    else:
        raise AssertionError(f"siftc bug: --config cannot check {param.name}'s type {t!r}")
    if not ok:
        yaml_float = isinstance(value, str) and want == "a number" and _is_number(value)
        hint = f" (YAML 1.1 reads {value} as a string: write {_yaml_float(value)})" if yaml_float else ""
        raise UsageError(f"{path}: {key} is {value!r}, expected {want}{hint}")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _yaml_float(text: str) -> str:
    """'3e-3' -> '3.0e-3', the form YAML 1.1 reads as a float."""
    mantissa, _, exponent = text.lower().partition("e")
    return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}" if exponent else text
