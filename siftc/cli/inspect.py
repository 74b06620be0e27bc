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
    norms = "" if "non_weight_flops" in report else \
        f"; extra non-weight FLOPs (branch norms) {report['extra_flops']:,}"  # wide: its own line below
    console.print(f"weight FLOPs {report['flops']:,} vs dense {report['dense_flops']:,} "
                  f"(ratio {report['flop_ratio']:.4f}){norms}; non-zero params {report['nonzero_params']:,} "
                  f"of {report['params']:,} (dense model {report['dense_params']:,})")
    for r in report["layers"]:
        if r["kind"] in ("skipped", "dense") and r["reason"]:
            console.print(f"{r['kind']} {r['name']}: {r['reason']}")
    for note in report.get("notes", ()):  # not iso-FLOP (kind sparse), pretrained weights kept or fresh
        console.print(note, markup=False, highlight=False)
    if "groups" in report:
        _print_groups(console, report)
    _print_trace(console, report.get("trace"))


def _print_trace(console, trace: dict | None):
    """How the model was traced: the inputs, and what a concrete trace fixed on the example."""
    if not trace:
        return
    shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in zip(trace["inputs"], trace["input_shapes"]))
    how = {"fx": "torch.fx", "concrete": "concrete shapes (the model decides on shapes)",
           "given": "a GraphModule, as given"}[trace["how"]]
    console.print(f"traced with {how}; inputs: {shapes}")
    for name, value in trace.get("constants", {}).items():
        console.print(f"  {name} = {value} (its default; not an input of the converted model)")
    for s in trace.get("specializations", []):
        console.print(f"  {s['text']}")


def _print_groups(console, report: dict):
    """wide: every width group (members, dense and new width, why it kept its width) and the non-weight
    FLOPs a wider stream adds beside the weight FLOPs."""
    from rich.table import Table

    table = Table(title="width groups", title_justify="left")
    for col in ("group", "width", "new width", "members", "left fixed because"):
        table.add_column(col, justify="right" if "width" in col else "left")
    for g in report["groups"]:
        more = f" (+{len(g['members']) - 4} more)" if len(g["members"]) > 4 else ""
        table.add_row(str(g["id"]), str(g["width"]), str(g["new_width"]), ", ".join(g["members"][:4]) + more,
                      g["fixed"] or "")
    console.print(table)
    nw = report["non_weight_flops"]
    console.print(f"non-weight FLOPs ({nw['counted']}): {nw['dense']:,} dense, {nw['wide']:,} wide "
                  f"(+{nw['extra']:,}), beside the weight FLOPs above")


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

    meta = read_meta(artifact)
    report = meta["report"]
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        print_report(report)
        print_provenance(meta)


def print_provenance(meta: dict):
    """Where the model came from, and whether loading it needs that file."""
    src = meta.get("source")
    click.echo(f"source: {src['spec']} (sha256 {src['sha256'] or '-'})" if src else "source: an in-memory model")
    if meta["version"] < 3:
        click.echo(f"artifact version {meta['version']}: loads only with --trust-source (imports the model "
                   f"file); convert again for a self-contained artifact")
    elif meta.get("needs_source"):
        click.echo(f"needs its model file to load (--trust-source): {meta['needs_source']}")
    else:
        click.echo("self-contained: loads without the model file (graph.json)")
    for note in meta.get("notes") or ():
        click.echo(f"note: {note}")
