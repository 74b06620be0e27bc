"""`siftc convert`: trace, rewrite, verify, save."""
import contextlib
import json
import sys
import time

import click

from siftc.cli.options import defaults
from siftc.config import BRANCH_ACTS, ConvertConfig
from siftc.passes import KINDS
from siftc.passes.same_shape import MASKS
from siftc.sparse.distribution import DISTRIBUTIONS

DEFAULT = defaults(ConvertConfig)


def _sparsity(ctx, param, value):
    if value is not None and not 0 <= value < 1:
        raise click.BadParameter(f"{value} is outside [0, 1); e.g. --sparsity 0.9")
    return value


def _round_to(ctx, param, value):
    try:
        return int(value)  # the range is checked by siftc.config, for the Python API too
    except ValueError:
        raise click.BadParameter(f"{value} is not a positive integer; e.g. --round-to 8") from None


@click.command("convert")
@click.argument("model")
@click.option("--kind", "-k", required=True, type=click.Choice(tuple(KINDS)),
              help="Sparse-IFT family (iso-FLOP), or sparse: every layer keeps its shape (not iso-FLOP).")
@click.option("--sparsity", "-s", type=float, callback=_sparsity,
              help="Fraction of zero weights in the sparse layers, in [0, 1). Required, except with "
                   "--mask-from zeros, which takes it from the weights (and checks it if given).")
@click.option("--weights", type=click.Path(), default=None, metavar="FILE",
              help="State dict of the dense model (.pt via torch.save, read weights-only; or .safetensors), "
                   "loaded before converting.")
@click.option("--model-arg", "model_arg", multiple=True, metavar="KEY=VALUE",
              help="Keyword argument for the factory (repeatable); VALUE is a Python literal, else a string.")
@click.option("--mask-from", type=click.Choice(tuple(MASKS)), default=DEFAULT["mask_from"], show_default=True,
              help="sparse: each layer's mask from its largest |w|, from the weights' own zeros, or random.")
@click.option("--distribution", type=click.Choice(tuple(DISTRIBUTIONS)), default=DEFAULT["distribution"],
              show_default=True, help="sparse: non-zeros per layer, s in each (uniform) or ERK (same total FLOPs).")
@click.option("--pattern", default=DEFAULT["pattern"], show_default=True, metavar="P",
              help="Sparsity pattern of the sparse layers: unstructured, block:RxC (e.g. block:4x1, block:4x4), "
                   "nm:N:M (e.g. nm:2:4; density N/M, any kind) or nm:N:M:t (transposable). A layer it does not fit "
                   "gets the largest fitting one (the report says which).")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Artifact directory to write. [default: <model>-<kind><percent>]")
@click.option("--keep-dense", multiple=True, metavar="PATTERN",
              help="Keep layers matching this fnmatch pattern dense (repeatable). "
                   "[default: first and last weight layer]")
@click.option("--no-keep-dense", is_flag=True, help="Transform the first and last weight layer too.")
@click.option("--branch-act", type=click.Choice(BRANCH_ACTS), default=DEFAULT["branch_act"], show_default=True,
              help="Non-linearity in parallel branches and the factorized middle.")
@click.option("--round-to", type=str, default=DEFAULT["round_to"], show_default=True, callback=_round_to, metavar="M",
              help="wide: make widths multiples of this.")
@click.option("--widen-heads", is_flag=True, help="wide: widen attention head dimension too.")
@click.option("--strict", is_flag=True, help="Fail on a layer or width group siftc cannot transform.")
@click.option("--leaf", multiple=True, metavar="PATTERN",
              help="Keep modules matching this fnmatch pattern (path or class name) opaque and as they are "
                   "(repeatable): for a module that branches on tensor values.")
@click.option("--seed", type=int, default=DEFAULT["seed"], show_default=True, help="Seed for weight init and masks.")
@click.option("--input-shape", default=None, metavar="1,3,224,224",
              help="Example input shape, when the model file has no example_inputs().")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def convert(model, kind, sparsity, weights, model_arg, mask_from, distribution, pattern, output, keep_dense,
            no_keep_dense, branch_act, round_to, widen_heads, strict, leaf, seed, input_shape, force, as_json):
    """Convert MODEL (model.py[:factory] or pkg.module:factory) into a Sparse-IFT artifact.

    Importing MODEL runs its code. Examples:

    \b
      siftc convert examples/mlp.py --kind parallel --sparsity 0.9 -o out/mlp-par90
      siftc convert examples/resnet.py:resnet18_cifar --kind factorized --sparsity 0.75
      siftc convert examples/gpt.py:gpt --kind doped --sparsity 0.5 --keep-dense 'blocks.0.*'
      siftc convert mymodel.py --kind wide --sparsity 0.75 --leaf 'router'   # opaque, left dense
      siftc convert examples/mlp.py --kind sparse --sparsity 0.9 --weights dense.pt --mask-from magnitude
      siftc convert examples/resnet.py:resnet18_cifar --kind sparse --weights pruned.safetensors --mask-from zeros
      siftc convert examples/mlp.py:MLP --model-arg hidden=512 --kind wide --sparsity 0.75
      siftc convert examples/resnet.py:resnet18_cifar --kind wide --sparsity 0.9 --pattern block:4x1
    """
    from pathlib import Path

    import siftc
    from siftc.artifact import FORMAT
    from siftc.cli.inspect import print_report
    from siftc.errors import UsageError
    from siftc.source import parse_model_args, parse_shape
    from siftc.store import check_output

    if no_keep_dense and keep_dense:
        raise UsageError("--keep-dense and --no-keep-dense contradict each other; pass one of them")
    model_args = parse_model_args(model_arg)
    stem = Path(model.partition(":")[0]).stem + (f"-{model.partition(':')[2]}" if ":" in model else "")
    out = Path(output or f"{stem}-{kind}{round(sparsity * 100) if sparsity is not None else '-' + mask_from}")
    inputs = tuple(f for f in (Path(model.partition(":")[0]), weights and Path(weights)) if f and f.exists())
    check_output(out, force, want=FORMAT, inputs=inputs)  # fail before any work is done
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the model file's own prints never mix into --json
        gm = siftc.convert(model, kind, sparsity, keep_dense=() if no_keep_dense else (keep_dense or None),
                           branch_act=branch_act, seed=seed, round_to=round_to, strict=strict,
                           widen_heads=widen_heads, leaf=leaf,
                           input_shape=parse_shape(input_shape) if input_shape else None, weights=weights,
                           model_args=model_args, mask_from=mask_from, distribution=distribution,
                           pattern=pattern)
    siftc.save(gm, out, force=force)
    report = gm.siftc_info.report
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    print_report(report)
    click.echo(f"wrote {out}/ in {time.perf_counter() - t0:.1f}s; next: siftc inspect {out}")
