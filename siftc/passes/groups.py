"""Width groups: which tensor dimensions of an fx graph must keep equal sizes when a network widens.

Every dimension of every tensor in the graph gets a *label*: a tuple of pieces `(group id, multiplier)`
laid out along that dimension, so its size is `sum(width(group) * multiplier)`. Rules
(`siftc.passes.width_rules`) read the labels of a node's inputs and give the labels of its output,
tying, stacking or fixing groups on the way. Example, a two-layer MLP:

    x (B, 64) --fc1--> h (B, 256) --relu--> (B, 256) --fc2--> y (B, 10)
    x: ((g0,),(g1,))   g0 batch, g1 input features: fixed ("model input")
    h: ((g0,),(g2,))   g2 = fc1's out side = fc2's in side: a width that widens (256 -> round(k*256))
    y: ((g0,),(g3,))   g3 fixed ("model output")

A residual add ties groups (union-find), `cat` concatenates labels, `flatten` multiplies a piece by
the spatial size, `split` turns a group into the sum of new groups, and a view into heads either fixes
a group or makes it `heads x head_dim`. The result lives on the graph: `node.meta["siftc.dims"]`
holds each output dimension's resolved label (a list of them for tuple outputs).
"""
import math
from dataclasses import dataclass, field

import torch.fx

from siftc.errors import TraceError
from siftc.passes.width_rules import rule_for
from siftc.trace import node_shape

Label = tuple  # ((group id, multiplier), ...) along one tensor dimension


@dataclass
class Group:
    size: int                        # dense width
    parent: int                      # union-find
    fixed: str | None = None         # why this group keeps its width
    no_rule: str | None = None       # the op without a width rule that fixed it, if that is why
    structural: bool = False         # batch, sequence, spatial, head count: never a width
    sourced: bool = False            # a weight layer or embedding produces it, so it widens
    divisors: set = field(default_factory=set)   # its width must stay a multiple of each
    alias: Label | None = None       # set when the group became the sum of other groups
    scale: int = 1                   # it shows as scale x its width (head_dim in heads x head_dim)


class Analysis:
    """Runs the width rules over a shape-propagated GraphModule, once, in graph order."""

    def __init__(self, gm: torch.fx.GraphModule, widen_heads: bool = False):
        self.gm, self.widen_heads = gm, widen_heads
        self.groups: list[Group] = []
        self.uses: dict[str, dict] = {}         # module name or param target -> {side: label}
        self.rewrites: list[tuple] = []         # (node, how): size arguments that follow widths

    # ---- groups -------------------------------------------------------------------------------
    def fresh(self, size: int, fixed: str | None = None, structural: bool = False,
              sourced: bool = False) -> Label:
        self.groups.append(Group(size, len(self.groups), fixed, None, structural, sourced))
        return ((len(self.groups) - 1, 1),)

    def find(self, g: int) -> int:
        while self.groups[g].parent != g:
            self.groups[g].parent = self.groups[self.groups[g].parent].parent
            g = self.groups[g].parent
        return g

    def resolve(self, label: Label) -> Label:
        """Pieces in terms of root groups that are not aliases."""
        out = []
        for g, m in label:
            r = self.find(g)
            alias = self.groups[r].alias
            out += [(h, m * c) for h, c in self.resolve(alias)] if alias else [(r, m)]
        return tuple(out)

    def size(self, label: Label) -> int:
        return sum(self.groups[g].size * m for g, m in label)

    def is_width(self, label: Label) -> bool:
        """True if some piece could still widen (not fixed)."""
        return any(self.groups[g].fixed is None for g, _ in self.resolve(label))

    def fix(self, label: Label, why: str, no_rule: str | None = None):
        for g, _ in self.resolve(label):
            if self.groups[g].fixed is None:
                self.groups[g].fixed, self.groups[g].no_rule = why, no_rule

    def divide(self, label: Label, d: int):
        """Every piece's width must stay a multiple of `d` (group norm groups, conv groups)."""
        for g, m in self.resolve(label):
            if d // math.gcd(d, m) > 1:
                self.groups[g].divisors.add(d // math.gcd(d, m))

    def _union(self, a: int, b: int):
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        ga, gb = self.groups[a], self.groups[b]
        gb.parent = a
        if ga.fixed is None:
            ga.fixed, ga.no_rule = gb.fixed, gb.no_rule
        ga.structural = ga.structural and gb.structural
        ga.sourced = ga.sourced or gb.sourced
        ga.divisors |= gb.divisors

    def _alias(self, g: int, pieces: Label):
        """Group g becomes `pieces` (its fixedness, sources and divisors move to them)."""
        grp = self.groups[g]
        grp.alias = pieces
        for h, c in pieces:
            target = self.groups[h]
            target.sourced = target.sourced or grp.sourced
            if grp.fixed and target.fixed is None:
                target.fixed, target.no_rule = grp.fixed, grp.no_rule
            target.divisors |= {d // math.gcd(d, c) for d in grp.divisors if d // math.gcd(d, c) > 1}

    def split(self, label: Label, sections: list[int]) -> list[Label] | None:
        """Labels of `sections` cut from `label` in order, making new groups if one group is cut."""
        pieces = self.resolve(label)
        sizes = [self.groups[g].size * m for g, m in pieces]
        out, i = [], 0
        for s in sections:  # sections that fall on piece boundaries take those pieces
            j, total = i, 0
            while j < len(pieces) and total < s:
                total += sizes[j]
                j += 1
            if total != s:
                break
            out.append(pieces[i:j])
            i = j
        else:
            return out
        if len(pieces) != 1 or pieces[0][1] != 1:
            return None
        (g, _), = pieces
        new = [self.fresh(s, structural=self.groups[g].structural) for s in sections]
        self._alias(g, tuple(p for lab in new for p in lab))
        return new

    def tie(self, a: Label, b: Label, why: str):
        """The two dimensions are the same tensor dimension: make their labels agree."""
        ea, eb = self.resolve(a), self.resolve(b)
        if ea == eb:
            return
        if self.size(ea) != self.size(eb):  # not one dimension after all: neither may change
            self.fix(a, why)
            self.fix(b, why)
            return
        if len(ea) == len(eb) and all(m == n for (_, m), (_, n) in zip(ea, eb)):
            for (g, _), (h, _) in zip(ea, eb):
                self._union(g, h)
            return
        if len(ea) == 1 and len(eb) > 1 or len(eb) == 1 and len(ea) > 1:
            (g, m), other = (ea[0], eb) if len(ea) == 1 else (eb[0], ea)
            if all(c % m == 0 for _, c in other) and g not in {h for h, _ in other}:
                self._alias(g, tuple((h, c // m) for h, c in other))
                return
        if len(ea) == 1 and len(eb) == 1:
            (g, m), (h, n) = ea[0], eb[0]
            if n % m == 0:
                self._alias(g, ((h, n // m),))
                return
            if m % n == 0:
                self._alias(h, ((g, m // n),))
                return
        self.fix(a, why)
        self.fix(b, why)

    # ---- nodes --------------------------------------------------------------------------------
    shape = staticmethod(node_shape)

    @staticmethod
    def dims(node):
        return node.meta.get("siftc.dims") if isinstance(node, torch.fx.Node) else None

    def run(self):
        for node in self.gm.graph.nodes:
            if node.op != "output" and "tensor_meta" not in node.meta:
                continue  # ints, sizes, devices: no widths
            try:
                node.meta["siftc.dims"] = rule_for(self.gm, node)(self, node)
            except TraceError:
                raise
            except Exception as e:  # a rule met a form it does not know: say where
                raise TraceError(f"wide: width analysis failed at node {node.name} ({node.op} "
                                 f"{node.target}): {type(e).__name__}: {e}") from e
        for node in self.gm.graph.nodes:
            dims = node.meta.get("siftc.dims")
            if isinstance(dims, list):
                node.meta["siftc.dims"] = [None if d is None else tuple(self.resolve(l) for l in d) for d in dims]
            elif dims is not None:
                node.meta["siftc.dims"] = tuple(self.resolve(l) for l in dims)
        self.resolve_uses()
        return self

    def resolve_uses(self):
        """Rewrite every module side in terms of root groups (after ties made since the last time)."""
        self.uses = {k: {s: self.resolve(l) for s, l in v.items()} for k, v in self.uses.items()}

    def use(self, name: str, **sides):
        """Module or parameter `name` is built from these widths (e.g. in=..., out=...); a second call
        of the same module must agree with the first."""
        if name in self.uses:
            for side, label in sides.items():
                self.tie(self.uses[name][side], label, f"{name} is called twice with different widths")
        else:
            self.uses[name] = dict(sides)

    # ---- results ------------------------------------------------------------------------------
    def widths(self, grow) -> dict[int, int]:
        """New width of every root group; `grow(size, divisors, scale)` widens one that may widen."""
        out = {}
        for g, grp in enumerate(self.groups):
            if self.find(g) == g and grp.alias is None:
                widen = grp.fixed is None and grp.sourced and not grp.structural
                out[g] = grow(grp.size, grp.divisors, grp.scale) if widen else grp.size
        return out

    def why_fixed(self, g: int) -> str:
        grp = self.groups[g]
        if grp.fixed:
            return grp.fixed
        return "" if grp.sourced else "no weight layer produces it"

    def members(self) -> dict[int, list[str]]:
        """Root group -> the module sides and parameters whose size it sets, as `name:side`; a side
        made of pieces names the dense slice each group holds (`c_attn:out[128:256]`, the k of q, k, v),
        and a side that is several times the group's width says so (`fc1:in (16x)`, after a flatten)."""
        out: dict[int, list[str]] = {}
        for name, sides in self.uses.items():
            for side, label in sides.items():
                start = 0
                for g, m in label:
                    end = start + self.groups[g].size * m
                    if not self.groups[g].structural:
                        where = f"[{start}:{end}]" if len(label) > 1 else ""
                        out.setdefault(g, []).append(f"{name}:{side}{where}" + (f" ({m}x)" if m != 1 else ""))
                    start = end
        return out


def analyse(gm: torch.fx.GraphModule, widen_heads: bool = False) -> Analysis:
    """Width groups of a traced, shape-propagated graph (see `siftc.trace.trace`)."""
    return Analysis(gm, widen_heads).run()
