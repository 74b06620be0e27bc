"""A concrete trace's input guard (siftc.concrete_trace.InputGuard) as data, and back.

    before   InputGuard(Guards(names=["idx"], ranks={"idx": 2}, symbols={"s49": ("idx", 1)},
                               specializations=[Specialization("bool", True, "s49 <= 32", ...)]))
    data     {"name": "siftc_input_guard", "class": "siftc.concrete_trace.InputGuard",
              "guards": Guards.to_json()}
    after    the same guard: a later input the graph cannot serve is refused, as before saving

A guard is a condition ShapeEnv printed over input sizes (`s49 <= 32`, `Eq(s36, 32)`), which
Guards.check hands to sympy, and sympy parses by `eval`. So every stored guard is first parsed with
Python's `ast` and refused unless it is arithmetic and comparisons on the guard's own symbols, small
integer constants and sympy's (and torch's sympy) functions by name: no attributes, subscripts, strings,
lambdas or powers reach sympy.
"""
import ast
import json

from siftc.graph_data import NotData, Refused

CLASS = "siftc.concrete_trace.InputGuard"
MAX_GUARD = 1000  # characters: ShapeEnv's guards on input sizes are short
MAX_INT = 1 << 62
_FUNCTIONS = {"Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Mod", "floor", "ceiling", "Max", "Min", "Abs", "And", "Or",
              "Not"}
_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div,
          ast.FloorDiv, ast.Mod, ast.UnaryOp, ast.USub, ast.UAdd, ast.Not, ast.Compare, ast.Eq, ast.NotEq,
          ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Call, ast.Name, ast.Load, ast.Constant, ast.BitAnd, ast.BitOr)


def is_guard(m) -> bool:
    from siftc.concrete_trace import InputGuard
    return type(m) is InputGuard


def to_data(name: str, m) -> dict:
    """The guard's record, checked to load back as the same guard (NotData if not)."""
    rec = {"name": name, "class": CLASS, "guards": json.loads(json.dumps(m.guards.to_json()))}
    try:
        same = _checked(from_data(rec).guards.to_json()) == _checked(rec["guards"])
    except Refused as e:
        raise NotData(f"module {name} {e}") from None
    if not same:
        raise NotData(f"module {name}'s input guard does not rebuild from its data to the same guard")
    return rec


def from_data(rec: dict):
    """The InputGuard `rec` stores; Refused unless every part has its form and every guard is arithmetic."""
    from siftc.concrete_trace import Guards, InputGuard

    d = rec.get("guards")
    if rec.get("class") != CLASS or not isinstance(d, dict):
        raise Refused(f"stores an input guard {str(rec)[:80]} of no known form")
    names = d.get("names")
    symbols = d.get("symbols")
    if not _all(names, list, str) or not _all(d.get("ranks"), dict, int) or not _all(d.get("dtypes"), dict, str) or \
            not isinstance(symbols, dict) or not all(_dim(v) for v in symbols.values()) or \
            not isinstance(d.get("specializations"), list) or not isinstance(d.get("constants", {}), dict):
        raise Refused(f"module {rec.get('name')} stores an input guard of no known form")
    for s in d["specializations"]:
        if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("kind", "value", "guard", "where",
                                                                                 "code")) or \
                not isinstance(s.get("dims"), list) or not all(isinstance(x, list) and len(x) == 3 and
                                                               _dim(x[:2]) for x in s["dims"]):
            raise Refused(f"module {rec.get('name')} stores a shape guard of no known form")
        if s["guard"]:
            check_guard(s["guard"], set(symbols))
    try:
        return InputGuard(Guards.from_json(d))
    except (KeyError, TypeError, ValueError) as e:
        raise Refused(f"module {rec.get('name')} stores an input guard of no known form ({e})") from e


def _checked(d: dict) -> dict:
    """What Guards.check and the messages read (the decisions' values and the defaults are stored as
    their repr, for reading only)."""
    return {**{k: v for k, v in d.items() if k != "constants"},
            "specializations": [{k: v for k, v in s.items() if k != "value"} for s in d["specializations"]]}


def _all(v, kind: type, item: type) -> bool:
    values = v.values() if isinstance(v, dict) else v
    return isinstance(v, kind) and all(isinstance(x, item) for x in values) and \
        (kind is not dict or all(isinstance(k, str) for k in v))


def _dim(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def check_guard(text: str, symbols: set):
    """Refused unless `text` is arithmetic and comparisons on `symbols`, integers and the functions above."""
    try:
        tree = ast.parse(text, mode="eval") if len(text) <= MAX_GUARD else None
    except SyntaxError:
        tree = None
    bad = "too long or not an expression" if tree is None else next(
        (_why(n, symbols) for n in ast.walk(tree) if _why(n, symbols)), None)
    if bad:
        raise Refused(f"holds a shape guard {text[:60]!r} that is not arithmetic on input sizes ({bad})")


def _why(node, symbols: set) -> str | None:
    if not isinstance(node, _NODES):
        return f"{type(node).__name__} is not allowed"
    if isinstance(node, ast.Name) and node.id not in symbols and node.id not in _functions():
        return f"{node.id} is neither an input size nor an allowed function"
    if isinstance(node, ast.Call) and (not isinstance(node.func, ast.Name) or node.func.id not in _functions()
                                       or node.keywords):
        return "only calls of allowed functions by name"
    if isinstance(node, ast.Constant) and (type(node.value) not in (int, bool) or abs(node.value) > MAX_INT):
        return f"constant {str(node.value)[:20]} is not a small integer"
    return None


def _functions() -> set:
    """sympy's relations and functions ShapeEnv prints, and torch's own sympy functions (as _holds reads them)."""
    import sympy
    import torch.utils._sympy.functions as fns
    return _FUNCTIONS | {k for k, v in vars(fns).items() if isinstance(v, type) and issubclass(v, sympy.Basic)}
