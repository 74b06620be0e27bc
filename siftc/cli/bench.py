"""`siftc bench`: latency and throughput of ONNX files on DeepSparse, ONNX Runtime and PyTorch."""
from pathlib import Path

import click
from click.core import ParameterSource

from siftc.artifact import trusting
from siftc.bench.engine import ENGINES
from siftc.bench.runner import DEFAULT_TIME_S, BenchConfig
from siftc.cli.options import defaults, trust_source_option
from siftc.config import ConvertConfig
from siftc.export import DEFAULT_OPSET
from siftc.passes import KINDS

DEFAULT = defaults(BenchConfig)
ROUND_TO = defaults(ConvertConfig)["round_to"]


def _ints(text: str, what: str) -> tuple[int, ...]:
    from siftc.errors import UsageError
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{what} {text!r} must be positive integers, comma-separated, e.g. 1,64")
    return values


def _floats(text: str) -> tuple[float, ...]:
    from siftc.errors import UsageError
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"--sparsities {text!r} must be numbers in [0, 1), e.g. 0,0.5,0.75,0.9") from None


@click.command("bench")
@click.argument("models", nargs=-1)
@click.option("--engine", "engines", default=",".join(DEFAULT["engines"]), show_default=True,
              help=f"Comma-separated engines: {', '.join(ENGINES)}.")
@click.option("--batch", "batches", default=",".join(map(str, DEFAULT["batches"])), show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--threads", type=int, default=None, help="Threads (cores) per engine.  [default: all usable cores]")
@click.option("--warmup", type=int, default=DEFAULT["warmup"], show_default=True, help="Untimed calls per engine first (the first also compares the engines' outputs).")
@click.option("--time", "time_s", type=float, default=DEFAULT_TIME_S, show_default=True,
              help="Measured seconds per (model, engine, batch).")
@click.option("--iterations", type=int, default=None, help="Measured calls per (model, engine, batch), instead of --time.")
@click.option("--turns", type=int, default=DEFAULT["turns"], show_default=True,
              help="Engines take turns this many times, so machine drift hits all.")
@click.option("--baseline", type=click.Path(), default=None, metavar="FILE",
              help="With several MODELS: the one each row's items/s is divided by (÷baseline column; same "
              "engine and batch), benched too if not among them.  [default: the first MODEL]")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the results as JSON here.")
@click.option("--plot", "plot_out", type=click.Path(), default=None,
              help="With --sweep: draw latency relative to dense against sparsity here (PNG).")
@click.option("--sweep", "sweep_model", default=None, metavar="MODEL.PY[:FACTORY]",
              help="Convert, export and bench MODEL at each --sparsities point instead of given files.")
@click.option("--kind", type=click.Choice(tuple(KINDS)), default="wide", show_default=True,
              help="With --sweep: the Sparse-IFT kind.")
@click.option("--sparsities", default="0,0.5,0.75,0.9", show_default=True, help="With --sweep: the points.")
@click.option("--out-dir", type=click.Path(), default=None,
              help="With --sweep: where artifacts and ONNX files go (reused when up to date).  [default: sweep-<model>-<kind>]")
@click.option("--round-to", type=int, default=ROUND_TO, show_default=True, help="With --sweep: width multiple (wide).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="With --sweep: ONNX opset.")
@click.option("--dynamic-batch", is_flag=True, help="With --sweep: export a free batch dimension.")
@click.option("--force", is_flag=True, help="Replace --json/--plot files siftc wrote; with --sweep, also rebuild "
              "every point even if up to date.")
@trust_source_option
@click.pass_context
def bench_cmd(ctx, models, engines, batches, threads, warmup, time_s, iterations, turns, baseline, json_out,
              plot_out, sweep_model, kind, sparsities, out_dir, round_to, opset, dynamic_batch, force, trust_source):
    """Benchmark MODELS (.onnx files) on each engine with the same inputs, after warm-up, in turns.

    Reports p50/p90/p99/mean latency, items/s and threads per (model, engine, batch), and for
    DeepSparse the fraction of the graph it runs on its own (sparse) kernels. An engine that cannot
    run here is a note; the others still run. The torch engine rebuilds the PyTorch model named in
    the file's siftc sidecar. With several models, ÷baseline is each row's items/s over the baseline
    model's (--baseline, else the first) on the same engine and batch. A row whose p99/p50 or spread
    of per-turn medians is too large is marked unstable, and no ratio is read from it (n/a).

    \b
      siftc bench rn18-dense.onnx rn18-wide90.onnx --batch 64 --time 20
      siftc bench gpt.onnx --engine deepsparse,onnxruntime --batch 1,8 --iterations 200 --json out.json
      siftc bench --sweep examples/resnet.py:resnet18_imagenet --kind wide \\
          --sparsities 0,0.5,0.75,0.9 --batch 64 --plot sweep.png --json sweep.json
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from siftc.bench.engine import parse_engines
    from siftc.bench.plot import plot_sweep
    from siftc.bench.runner import FORMAT, bench, default_threads
    from siftc.errors import UsageError
    from siftc.extras import require
    from siftc.store import PLOT_TAG, check_output, sidecar_path, write_json

    if sweep_model and models:
        raise UsageError("pass either MODEL.onnx files or --sweep MODEL.py, not both")
    if not sweep_model and not models:
        raise UsageError("no model given; pass MODEL.onnx files (from siftc export) or --sweep model.py")
    if plot_out and not sweep_model:
        raise UsageError("--plot draws a sweep; add --sweep model.py (or drop --plot)")
    if baseline and sweep_model:
        raise UsageError("a --sweep's baseline is its dense point; drop --baseline")
    if plot_out:
        require("matplotlib", "--plot")  # before the benchmark, not after it
    if iterations is not None and ctx.get_parameter_source("time_s") == ParameterSource.COMMANDLINE:
        raise UsageError("--time and --iterations contradict each other; pass one of them")
    # Before any work: the files this command reads are never what it writes.
    given = [*models, *([baseline] if baseline else [])]
    reads = [*given, *map(sidecar_path, given), sweep_model.partition(":")[0] if sweep_model else None]
    for path, want in ((json_out, FORMAT), (plot_out, PLOT_TAG)):
        if path:
            check_output(path, force, want=want, inputs=reads)
    if json_out and plot_out and Path(json_out).resolve() == Path(plot_out).resolve():
        raise UsageError(f"--json and --plot both name {json_out}; give them different files")
    cfg = BenchConfig(engines=tuple(parse_engines(engines)), batches=_ints(batches, "--batch"),
                      threads=default_threads() if threads is None else threads, warmup=warmup,
                      time_s=None if iterations is not None else time_s, iterations=iterations, turns=turns)
    err = Console(stderr=True)
    # Not a terminal (a log, a pipe): no bar, which would leave a blank line before an error.
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("starting", total=None)

        def progress(advance, total, label):
            bar.update(task, advance=advance, total=total, **({"description": label} if label else {}))

        def step(label):
            bar.update(task, description=label)

        if sweep_model:
            from siftc.bench.sweep import run_sweep
            stem = Path(sweep_model.partition(":")[0]).stem + (f"-{sweep_model.partition(':')[2]}" if ":" in sweep_model else "")
            with trusting(True):  # --sweep converts the model file it names: the torch engine may rebuild it
                result = run_sweep(sweep_model, kind, _floats(sparsities), Path(out_dir or f"sweep-{stem}-{kind}"),
                                   cfg, opset=opset, round_to=round_to,
                                   dynamic_batch=dynamic_batch, force=force, progress=progress, step=step)
        else:
            with trusting(trust_source):  # the torch engine may import a model file a sidecar names
                result = bench(models, cfg, progress=progress, baseline=baseline)
    print_results(result)
    if json_out:
        check_output(json_out, force, want=FORMAT, inputs=reads)  # again: the run took a while
        click.echo(f"wrote {write_json(json_out, result)}")
    if plot_out:
        check_output(plot_out, force, want=PLOT_TAG, inputs=reads)
        click.echo(f"wrote {plot_sweep(result, plot_out)}")


def print_results(result: dict):
    from rich.console import Console
    from rich.markup import escape  # notes are plain text: "siftc[deepsparse]" is not a style tag
    from rich.table import Table

    m = result["machine"]
    table = Table(title=f"siftc bench: {m['cpu']}, {m['usable_cores']} cores", title_justify="left")
    cols = ["model", "engine", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "mean ms", "items/s"]
    cols += ["÷baseline"] * ("baseline" in result) + ["notes"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "engine", "notes") else "right", no_wrap=col != "notes")
    for r in result["results"]:
        name = Path(r["model"]).name + (f" ({r['kind']} {r['sparsity']:g})" if r.get("kind") else "")
        if r["status"] != "ok":
            table.add_row(name, r["engine"], str(r["batch"]), str(r["threads"]), *["-"] * (len(cols) - 5),
                          escape(r.get("note", "")))
            continue
        vs = [_solid(r["vs_baseline"]["items_per_s"], r["vs_baseline"]["stable"])] if "baseline" in result else []
        table.add_row(name, r["engine"], str(r["batch"]), str(r["threads"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                      f"{r['p99_ms']:.2f}", f"{r['mean_ms']:.2f}", f"{r['items_per_s']:,.1f}", *vs,
                      escape("; ".join(_notes(r))))
    console = Console() if Console().is_terminal else Console(width=200)
    console.print(table)
    if "baseline" in result:
        console.print(f"÷baseline: items/s over {Path(result['baseline']).name}'s on the same engine and batch")
    if "sweep" in result:
        console.print(_sweep_table(result))
    for note in result["notes"]:
        console.print(f"note: {escape(note)}")


def _notes(r: dict) -> list[str]:
    notes = [] if r["stable"] else ["unstable: " + ", ".join(r["stability"]["reasons"])]
    if "supported_fraction" in r:
        notes.append(f"supported {r['supported_fraction']:.3f}")
        if r.get("sparse_layers_fallback"):
            notes.append(f"sparse layers NOT on DeepSparse kernels: {len(r['sparse_layers_fallback'])}")
        elif r.get("analysis_note"):
            notes.append("sparse-layer analysis failed (see JSON)")
        elif "sparse_layers_fallback" in r:
            notes.append("every sparse layer on its kernels")
    return notes


def _solid(ratio, stable: bool) -> str:
    """A ratio, or n/a when a side is missing, or n/a (unstable) when a side was not steady enough."""
    from siftc.bench.runner import times
    return times(ratio) if ratio is None or stable else "n/a (unstable)"


def _sweep_table(result: dict):
    from rich.table import Table

    points = result["sweep"]["points"]
    sweep = Table(title="latency relative to dense on the same engine (p50)", title_justify="left")
    engines = sorted({e for p in points for e in p["relative"]})
    for col in ["batch", "sparsity", *engines, "DeepSparse speed-up vs ORT"]:
        sweep.add_column(col, justify="right")
    for p in points:
        rel = [_solid(p["relative"].get(e), p["stable"].get(e, False)) for e in engines]
        speed = _solid(p.get("deepsparse_speedup_vs_onnxruntime"), p.get("deepsparse_speedup_stable", False))
        sweep.add_row(str(p["batch"]), f"{p['sparsity']:g}", *rel, speed)
    return sweep
