"""`siftc densify`: a sparse artifact to one whose every weight trains (dense fine-tuning, SPDF)."""
import time

import click

from siftc.artifact import trusting
from siftc.cli.options import trust_source_option


@click.command("densify")
@click.argument("artifact", type=click.Path())
@click.option("-o", "--output", type=click.Path(), required=True, help="Artifact directory to write.")
@click.option("--force", is_flag=True, help="Replace the output directory if it is a siftc artifact.")
@trust_source_option
def densify_cmd(artifact, output, force, trust_source):
    """Make every weight of ARTIFACT trainable: the shapes stay, the masks become all-ones.

    Each sparse layer becomes the dense layer of its (wide) shape: the non-zeros keep their values, the
    rest start at zero and learn from the next step on, so fine-tuning continues dense, as the paper's
    SPDF does. Its FLOPs are then the dense-shaped ones (inspect shows them).

    \b
      siftc densify runs/mlp-rigl/model -o out/mlp-densified
      siftc train out/mlp-densified --data data/digits.npz --steps 200 -o runs/mlp-dense-ft
    """
    from siftc.densify import densify_artifact

    t0 = time.perf_counter()
    with trusting(trust_source):
        dense = densify_artifact(artifact, output, force=force)
    report = dense.siftc_info.report
    was = report["densified"]
    layers = was["sparse_layers"]
    click.echo(f"wrote {output}/ in {time.perf_counter() - t0:.1f}s: {layers} sparse layer"
               f"{'s' * (layers != 1)} densified, {was['nonzero_params']:,} trainable params -> "
               f"{report['nonzero_params']:,}")
    click.echo(f"weight FLOPs are now the dense-shaped ones: {report['flops']:,} ({report['flop_ratio']:.2f}x "
               f"the dense model's; were {was['flops']:,}, {was['flop_ratio']:.2f}x); next: siftc train {output}")
