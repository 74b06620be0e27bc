"""Which weight layers a layer-wise pass transforms, and why the others are left alone."""
import fnmatch
from dataclasses import dataclass

import torch.fx
from torch import nn

from siftc.errors import UsageError
from siftc.layers import layer_type
from siftc.passes.record import LayerRecord


@dataclass
class Choice:
    name: str
    module: nn.Module
    transform: bool
    reason: str = ""
    unsupported: bool = False   # a layer type the kind cannot transform (an error with --strict)
    kept_dense: bool = False    # kept dense by the user's or the paper's choice, not for its type

    def left_as_is(self, dense_flops: int) -> LayerRecord:
        """The record of a layer a layer-wise pass does not transform: its FLOPs stay the dense ones."""
        t = layer_type(self.module)
        return LayerRecord(self.name, "dense" if self.kept_dense else "skipped", t.dense_shape(self.module),
                           reason=self.reason, search_space=t.weight_count(self.module), dense_flops=dense_flops,
                           flops=dense_flops)


def weight_layers(gm: torch.fx.GraphModule) -> list[tuple[str, nn.Module]]:
    """Modules with an entry in the layer table (`siftc.layers`), in call order, each once. The first
    and last are the paper's kept-dense layers (the stem and the classifier / LM head)."""
    seen, out = set(), []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in seen:
            mod = gm.get_submodule(node.target)
            if layer_type(mod) is not None:
                seen.add(node.target)
                out.append((node.target, mod))
    return out


def tied_weights(model: nn.Module) -> dict[str, str]:
    """module name -> name of another module sharing its weight Parameter."""
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter):
            owners.setdefault(id(w), []).append(name)
    tied = {}
    for names in owners.values():
        for n in names:
            others = [o for o in names if o != n]
            if others:
                tied[n] = others[0]
    return tied


def choose(gm: torch.fx.GraphModule, keep_dense: tuple[str, ...] | None, strict: bool) -> list[Choice]:
    layers = weight_layers(gm)
    if not layers:
        raise UsageError("the model has no Linear or Conv2d layer to transform")
    default = keep_dense is None
    patterns = keep_dense or ()
    tied = tied_weights(gm)
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n, _ in layers):
            raise UsageError(f"--keep-dense {p!r} matches no weight layer; layers are e.g. "
                             f"{', '.join(n for n, _ in layers[:4])}")
    edge = {layers[0][0], layers[-1][0]} if default else set()
    out = []
    for name, mod in layers:
        refusal = layer_type(mod).refusal(mod)
        if name in edge:
            out.append(Choice(name, mod, False, "kept dense (first/last weight layer)", kept_dense=True))
        elif any(fnmatch.fnmatchcase(name, p) for p in patterns):
            out.append(Choice(name, mod, False, "kept dense (--keep-dense)", kept_dense=True))
        elif refusal is not None:
            reason, unsupported = refusal
            out.append(Choice(name, mod, False, reason, unsupported=unsupported))
        elif name in tied:
            out.append(Choice(name, mod, False, f"weight tied to {tied[name]}: left as is", unsupported=True))
        else:
            out.append(Choice(name, mod, True))
    bad = [c for c in out if c.unsupported]
    if strict and bad:
        raise UsageError(f"--strict: cannot transform {bad[0].name} ({bad[0].reason}); "
                         f"keep it dense with --keep-dense '{bad[0].name}' or drop --strict")
    return out


def replace_submodule(gm: torch.fx.GraphModule, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
