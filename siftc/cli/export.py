"""`siftc export`: an artifact (or a dense model.py) to checked, plain ONNX."""
import inspect
import time

import click
from click.core import ParameterSource

from siftc.artifact import trusting
from siftc.cli.options import trust_source_option
from siftc.export import DEFAULT_OPSET, export
from siftc.export_checks import TINY

BATCH = inspect.signature(export).parameters["batch"].default  # export()'s own, so help shows what runs


@click.command("export")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(), required=True, help="ONNX file to write (a sidecar <file>.json goes beside it).")
@click.option("--batch", type=int, default=BATCH, show_default=True, help="Static batch size of the file.")
@click.option("--dynamic-batch", is_flag=True, help="Leave the batch dimension free instead (one file for every batch).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--force", is_flag=True, help="Replace the output file and its sidecar if they exist.")
@trust_source_option
@click.pass_context
def export_cmd(ctx, source, output, batch, dynamic_batch, opset, force, trust_source):
    """Export SOURCE to plain ONNX for DeepSparse, ONNX Runtime or any engine, and check it.

    SOURCE is an artifact directory from `siftc convert -o`, or a dense model.py[:factory] (its
    baseline; importing it runs its code). Masks are folded into the weights as exact zeros and
    BatchNorm is left for the engine to fold. The file is reported done only after the onnx checker,
    ONNX Runtime against PyTorch (|d| <= 1e-4 + 1e-3*|y|) and each weight's zeros against its mask.
    When the model's outputs do not vary with its input (activations that vanish at random init), a
    wrong file would give the same outputs: each weight layer's output is compared too, or the output
    says the check could not discriminate.

    \b
      siftc export out/rn18-wide90 -o rn18-wide90.onnx --batch 64
      siftc export examples/resnet.py:resnet18_imagenet -o rn18-dense.onnx --batch 64
      siftc export out/gpt-par90 -o gpt-par90.onnx --dynamic-batch
    """
    from rich.console import Console

    from siftc.errors import UsageError

    if dynamic_batch and ctx.get_parameter_source("batch") == ParameterSource.COMMANDLINE:
        raise UsageError("--batch and --dynamic-batch contradict each other; pass one of them")
    console = Console(stderr=True)
    t0 = time.perf_counter()
    with trusting(trust_source), console.status("exporting") as status:
        done = export(source, output, batch=None if dynamic_batch else batch, dynamic_batch=dynamic_batch,
                      opset=opset, force=force, progress=lambda step: status.update(step))
    m, c = done.meta, done.meta["checks"]
    sparse = [layer for layer in m["layers"] if layer["density"] < 1]
    click.echo(f"wrote {done.path} ({m['kind']}, sparsity {m['sparsity']:g}, batch "
               f"{'dynamic' if m['dynamic_batch'] else m['batch']}, opset {m['opset']}) in {time.perf_counter() - t0:.1f}s")
    click.echo(f"checked: onnx checker passed; ONNX Runtime vs PyTorch max |d| {c['max_abs_error']:.2e} "
               f"(allowed {c['atol']:g} + {c['rtol']:g}*|y|); {len(sparse)} sparse weights stored with "
               f"exactly their masks' zeros; {m['nonzero_params']:,} of {m['params']:,} params non-zero")
    click.echo(compared(c))
    click.echo(f"sidecar {done.sidecar}; next: siftc bench {done.path}")


def compared(c: dict) -> str:
    """What the ONNX Runtime vs PyTorch check compared, and whether it could tell a wrong file apart."""
    if c["outputs_vary"]:
        return f"compared: the outputs, which vary with the input (spread {c['output_spread']:.2e})"
    layers = [r for r in c["layers_compared"] if r["scale"] > TINY]
    still = f"the outputs do not vary with the input (spread {c['output_spread']:.2e})"
    if not c["discriminates"]:
        dead = len(c["layers_compared"]) - len(layers)
        why = [f"{k}: {v}" for k, v in c["layers_not_compared"].items()] + ([f"{dead} with outputs ~0"] if dead else [])
        why = why[:3] + ([f"{len(why) - 3} more in the sidecar"] if len(why) > 3 else [])  # one line
        return (f"warning: the check could not discriminate: {still}, and no weight layer's output could "
                f"stand in ({'; '.join(why) or 'the model has none'}); a wrong file would pass it")
    worst = max(r["max_abs_error"] / r["scale"] for r in layers)
    sparse = sum(r["sparse"] for r in layers)
    skipped = len(c["layers_not_compared"]) + len(c["layers_compared"]) - len(layers)
    return (f"compared: {still}, so {len(layers)} weight layers' outputs ({sparse} sparse) were compared too "
            f"(max |d| {worst:.2e} of each layer's largest |y|)"
            + (f"; {skipped} could not be (the sidecar's checks say why)" if skipped else ""))
