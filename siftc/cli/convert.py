"""`siftc convert`: trace, rewrite, verify, save."""
import contextlib
import json
import sys
import time

import click

from siftc.cli.options import defaults
from siftc.config import BRANCH_ACTS, ConvertConfig
from siftc.passes import KINDS

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
@click.option("--kind", "-k", required=True, type=click.Choice(tuple(KINDS)), help="Sparse-IFT family.")
@click.option("--sparsity", "-s", required=True, type=float, callback=_sparsity,
              help="Fraction of zero weights in the sparse layers, in [0, 1).")
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
def convert(model, kind, sparsity, output, keep_dense, no_keep_dense, branch_act, round_to, widen_heads,
            strict, leaf, seed, input_shape, force, as_json):
    """Convert MODEL (model.py[:factory] or pkg.module:factory) into a Sparse-IFT artifact.

    Importing MODEL runs its code. Examples:

    \b
      siftc convert examples/mlp.py --kind parallel --sparsity 0.9 -o out/mlp-par90
      siftc convert examples/resnet.py:resnet18_cifar --kind factorized --sparsity 0.75
      siftc convert examples/gpt.py:gpt --kind doped --sparsity 0.5 --keep-dense 'blocks.0.*'
      siftc convert mymodel.py --kind wide --sparsity 0.75 --leaf 'router'   # opaque, left dense
    """
    from pathlib import Path

    import siftc
    from siftc.artifact import FORMAT
    from siftc.cli.inspect import print_report
    from siftc.errors import UsageError
    from siftc.source import parse_shape
    from siftc.store import check_output

    if no_keep_dense and keep_dense:
        raise UsageError("--keep-dense and --no-keep-dense contradict each other; pass one of them")
    stem = Path(model.partition(":")[0]).stem + (f"-{model.partition(':')[2]}" if ":" in model else "")
    out = Path(output or f"{stem}-{kind}{round(sparsity * 100)}")
    model_file = Path(model.partition(":")[0])
    inputs = (model_file,) if model_file.exists() else ()
    check_output(out, force, want=FORMAT, inputs=inputs)  # fail before any work is done
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the model file's own prints never mix into --json
        gm = siftc.convert(model, kind, sparsity, keep_dense=() if no_keep_dense else (keep_dense or None),
                           branch_act=branch_act, seed=seed, round_to=round_to, strict=strict,
                           widen_heads=widen_heads, leaf=leaf,
                           input_shape=parse_shape(input_shape) if input_shape else None)
    siftc.save(gm, out, force=force)
    report = gm.siftc_info.report
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    print_report(report)
    click.echo(f"wrote {out}/ in {time.perf_counter() - t0:.1f}s; next: siftc inspect {out}")
