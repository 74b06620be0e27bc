"""The paper's picture: latency relative to the dense model against sparsity, per engine.

    iso-FLOP ideal     1.0 at every sparsity: same FLOPs, same time, if zeros were free
    no sparsity support ONNX Runtime: every zero is computed, so time grows with the parameters
    measured          DeepSparse: what a sparse engine recovers
"""
from pathlib import Path

from siftc.extras import require
from siftc.store import PLOT_TAG, PLOTS, os_errors, write_file

STYLE = {  # engine -> (label, colour, marker)
    "onnxruntime": ("ONNX Runtime (no sparsity support)", "tab:red", "s"),
    "torch": ("PyTorch eager (no sparsity support)", "tab:orange", "^"),
    "deepsparse": ("DeepSparse (measured)", "tab:blue", "o"),
}


def plot_sweep(result: dict, path, title: str | None = None) -> Path:
    """Draw `result["sweep"]["points"]` (from siftc.bench.sweep.run_sweep) to `path` (PNG/SVG/PDF)."""
    return plot_sweeps([result], path, [title] if title else None)


def plot_sweeps(results: list[dict], path, titles: list[str] | None = None) -> Path:
    """One panel per (sweep, batch), side by side, in one file."""
    require("matplotlib", "siftc bench --plot").use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    panels = [(r["sweep"], b, (titles or [None] * len(results))[i]) for i, r in enumerate(results)
              for b in sorted({p["batch"] for p in r["sweep"]["points"]})]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (sweep, batch, title) in zip(axes[0], panels):
        _draw(ax, sweep, batch, title)
    fig.tight_layout()
    path = Path(path)
    with os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    tag = {PLOTS[f".{fmt}"]: PLOT_TAG} if f".{fmt}" in PLOTS else None  # so --force knows it is siftc's
    write_file(path, lambda f: fig.savefig(f, format=fmt, dpi=120, metadata=tag))
    plt.close(fig)
    return path


def _draw(ax, sweep: dict, batch: int, title: str | None):
    points = [p for p in sweep["points"] if p["batch"] == batch]
    xs = [p["sparsity"] for p in points]
    ax.axhline(1.0, color="black", ls="--", lw=1, label="iso-FLOP ideal (1.0)")
    for engine, (label, colour, marker) in STYLE.items():
        pts = [(p["sparsity"], p["relative"][engine]) for p in points if engine in p["relative"]]
        if pts:
            ax.plot(*zip(*pts), marker=marker, color=colour, label=label)
            for x, y in pts:
                ax.annotate(f"{y:.1f}x", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=colour)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x:.0%}" for x in xs])
    ax.set_xlabel("sparsity")
    ax.set_ylabel("latency relative to dense (same engine)")
    ax.set_title(title or f"{sweep['model']}: Sparse {sweep['kind'].capitalize()}, batch {batch}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
