"""`siftc export`: an artifact (or a dense model.py) to checked, plain ONNX."""
import inspect
import time

import click
from click.core import ParameterSource

from siftc.export import DEFAULT_OPSET, export

BATCH = inspect.signature(export).parameters["batch"].default  # export()'s own, so help shows what runs


@click.command("export")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(), required=True, help="ONNX file to write (a sidecar <file>.json goes beside it).")
@click.option("--batch", type=int, default=BATCH, show_default=True, help="Static batch size of the file.")
@click.option("--dynamic-batch", is_flag=True, help="Leave the batch dimension free instead (one file for every batch).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--force", is_flag=True, help="Replace the output file and its sidecar if they exist.")
@click.pass_context
def export_cmd(ctx, source, output, batch, dynamic_batch, opset, force):
    """Export SOURCE to plain ONNX for DeepSparse, ONNX Runtime or any engine, and check it.

    SOURCE is an artifact directory from `siftc convert -o`, or a dense model.py[:factory] (its
    baseline; importing it runs its code). Masks are folded into the weights as exact zeros and
    BatchNorm is left for the engine to fold. The file is reported done only after the onnx checker,
    ONNX Runtime against PyTorch (|d| <= 1e-4 + 1e-3*|y|) and each weight's zeros against its mask.

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
    with console.status("exporting") as status:
        done = export(source, output, batch=None if dynamic_batch else batch, dynamic_batch=dynamic_batch,
                      opset=opset, force=force, progress=lambda step: status.update(step))
    m, c = done.meta, done.meta["checks"]
    sparse = [layer for layer in m["layers"] if layer["density"] < 1]
    click.echo(f"wrote {done.path} ({m['kind']}, sparsity {m['sparsity']:g}, batch "
               f"{'dynamic' if m['dynamic_batch'] else m['batch']}, opset {m['opset']}) in {time.perf_counter() - t0:.1f}s")
    click.echo(f"checked: onnx checker passed; ONNX Runtime vs PyTorch max |d| {c['max_abs_error']:.2e} "
               f"(allowed {c['atol']:g} + {c['rtol']:g}*|y|); {len(sparse)} sparse weights stored with "
               f"exactly their masks' zeros; {m['nonzero_params']:,} of {m['params']:,} params non-zero")
    click.echo(f"sidecar {done.sidecar}; next: siftc bench {done.path}")
