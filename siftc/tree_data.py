"""A graph's input and output structure (torch pytree specs) as data, and back.

    before   TreeSpec(CausalLMOutputWithPast, ['logits', 'cache'], [*, *])   (a HuggingFace model's output)
    data     {"type": "transformers.modeling_outputs.CausalLMOutputWithPast", "context": ["logits", "cache"],
              "children": ["*", "*"]}
    after    from_data(data) == before

A node is a tuple, list, dict or OrderedDict (context: the keys, str or int), or a HuggingFace
ModelOutput class from `transformers.modeling_outputs`, named by its qualified name; a leaf is "*".
A ModelOutput class defined elsewhere (a model's own modeling file, a user's class) is not imported
when loading: it is stored as a plain dict with the same keys, and a note says so (`to_data`'s notes go
into the artifact's siftc.json). Any other node type cannot be stored (graph_data.NotData).

Loading imports `transformers.modeling_outputs` only when the data names one of its classes. That runs
the installed transformers library's own code, as importing siftc runs torch's: the artifact chooses
which class of that one module, never which module or which code, and the class is checked to be a
ModelOutput that transformers registered with torch's pytree (its unflatten builds the dataclass from
the stored keys, nothing else).
"""
import collections
import importlib
import sys

from torch.utils import _pytree as pytree

from siftc.extras import require
from siftc.graph_data import NotData, Refused

LEAF = "*"
OUTPUTS = "transformers.modeling_outputs"  # the one module whose classes an artifact may name
PLAIN = {"tuple": tuple, "list": list, "dict": dict, "OrderedDict": collections.OrderedDict}
KEYED = ("dict", "OrderedDict")  # context: the keys


def to_data(spec: pytree.TreeSpec | None, notes: list) -> dict | str | None:
    """`spec` as JSON-able data; appends to `notes` what was stored other than as it is."""
    if spec is None:
        return None
    if spec.is_leaf():
        return LEAF
    children = [to_data(c, notes) for c in spec.children()]
    name = next((k for k, t in PLAIN.items() if spec.type is t), None)
    if name in KEYED:
        return {"type": name, "context": _keys(spec), "children": children}
    if name is not None:
        return {"type": name, "children": children}
    if _is_model_output(spec.type):
        keys = _keys(spec)
        if spec.type.__module__ == OUTPUTS and getattr(sys.modules[OUTPUTS], spec.type.__name__, None) is spec.type:
            return {"type": f"{OUTPUTS}.{spec.type.__name__}", "context": keys, "children": children}
        where = getattr(sys.modules.get(spec.type.__module__), "__file__", None) or spec.type.__module__
        note = (f"outputs of {spec.type.__qualname__} (from {where}) come back as a plain dict with its keys "
                f"({', '.join(map(str, keys))}): that class is not in {OUTPUTS}, so loading does not import it")
        if note not in notes:
            notes.append(note)
        return {"type": "dict", "context": keys, "children": children}
    raise NotData(f"the graph's inputs or outputs are a {spec.type.__module__}.{spec.type.__qualname__}, "
                  f"which is not stored as data (tuple, list, dict and {OUTPUTS} classes are)")


def _keys(spec: pytree.TreeSpec) -> list:
    keys = list(spec.context)
    if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys):
        raise NotData(f"the graph's inputs or outputs are keyed by {keys[:4]}: only str and int keys are "
                      f"stored as data")
    return keys


def _is_model_output(cls: type) -> bool:
    generic = sys.modules.get("transformers.utils.generic")  # not imported: nothing is a ModelOutput
    return generic is not None and isinstance(cls, type) and issubclass(cls, generic.ModelOutput)


def from_data(data) -> pytree.TreeSpec | None:
    """The TreeSpec `to_data` stored. Refused for anything but the node types above."""
    if data is None:
        return None
    if data == LEAF:
        return pytree.treespec_leaf()
    if not isinstance(data, dict) or not isinstance(data.get("children"), list) or \
            not isinstance(data.get("type"), str):
        raise Refused(f"holds an input or output structure {str(data)[:80]} of no known form")
    children = [from_data(c) for c in data["children"]]
    name = data["type"]
    if name in PLAIN:
        context = _context(data, len(children)) if name in KEYED else None
        return pytree.TreeSpec(PLAIN[name], context, children)
    return pytree.TreeSpec(_output_class(name), _context(data, len(children)), children)


def _context(data: dict, n: int) -> list:
    keys = data.get("context")
    if not isinstance(keys, list) or len(keys) != n or len(set(keys)) != n or \
            not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys):
        raise Refused(f"holds a {data['type']} with keys {str(keys)[:80]} that do not fit its {n} children")
    return keys


def _output_class(name: str) -> type:
    """The ModelOutput class `transformers.modeling_outputs.<Name>`; transformers is imported only here."""
    module, _, cls_name = name.rpartition(".")
    if module != OUTPUTS or not cls_name.isidentifier() or cls_name.startswith("_"):
        raise Refused(f"names output class {name}, which is not on the allow-list (tuple, list, dict, "
                      f"{OUTPUTS}.*)")
    require("transformers", f"an artifact returning a HuggingFace {cls_name}")
    outputs = importlib.import_module(OUTPUTS)
    cls = getattr(outputs, cls_name, None)
    if not _is_model_output(cls) or cls.__module__ != OUTPUTS or cls not in pytree.SUPPORTED_NODES:
        raise Refused(f"names output class {name}, which is not a ModelOutput of {OUTPUTS} in the installed "
                      f"transformers")
    return cls
