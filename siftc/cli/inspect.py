"""`siftc inspect`: the per-layer table of an artifact."""
import json

import click


def _m(flops: int) -> str:
    return f"{flops / 1e6:,.2f}"


def print_report(report: dict):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"siftc {report['kind']} @ sparsity {report['sparsity']}", title_justify="left")
    for col, just in (("layer", "left"), ("kind", "left"), ("dense shape", "left"), ("new shape", "left"),
                      ("density", "right"), ("dense MFLOPs", "right"), ("MFLOPs", "right"),
                      ("search space", "right")):
        table.add_column(col, justify=just, no_wrap=True)
    for r in report["layers"]:
        table.add_row(r["name"], r["kind"], "x".join(map(str, r["dense_shape"])), r["new_shape"] or "-",
                      f"{r['density']:.4f}", _m(r["dense_flops"]), _m(r["flops"]), f"{r['search_space']:,}")
    table.add_section()
    table.add_row("total", "", "", "", "", _m(report["dense_flops"]), _m(report["flops"]),
                  f"ratio {report['flop_ratio']:.4f}")
    console = Console() if Console().is_terminal else Console(width=200)
    console.print(table)
    console.print(f"weight FLOPs {report['flops']:,} vs dense {report['dense_flops']:,} "
                  f"(ratio {report['flop_ratio']:.4f}); extra non-weight FLOPs (branch norms) "
                  f"{report['extra_flops']:,}; non-zero params {report['nonzero_params']:,} "
                  f"of {report['params']:,} (dense model {report['dense_params']:,})")
    for r in report["layers"]:
        if r["kind"] == "skipped":
            console.print(f"skipped {r['name']}: {r['reason']}")


@click.command("inspect")
@click.argument("artifact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_cmd(artifact, as_json):
    """Print the per-layer table of ARTIFACT: shapes, density, FLOPs, search space.

    \b
      siftc inspect out/mlp-par90
      siftc inspect out/mlp-par90 --json | jq .flop_ratio
    """
    from siftc.artifact import read_meta

    report = read_meta(artifact)["report"]
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        print_report(report)
