"""Render the README's benchmark tables from benchmarks/results/*.json (nothing is typed by hand).

    python benchmarks/readme_tables.py            # print the Markdown
    python benchmarks/readme_tables.py --write    # replace the block between the README's markers
                                                  # and the pattern table between the patterns markers
    python benchmarks/readme_tables.py --results DIR   # render the JSON files in DIR instead

A result file that is missing is named in the output instead of its table, so a table can only show a
run that happened.
"""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- benchmarks:begin (python benchmarks/readme_tables.py --write) -->", "<!-- benchmarks:end -->"
PATTERNS_BEGIN = "<!-- patterns:begin (python benchmarks/readme_tables.py --write) -->"
PATTERNS_END = "<!-- patterns:end -->"  # the "Structured sparsity" section's table


def _load(name: str, results: Path = RESULTS):
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def convert_time(d) -> str:
    kinds = list(dict.fromkeys(r["kind"] for r in d["rows"]))
    models = list(dict.fromkeys(r["model"] for r in d["rows"]))
    cell = {(r["model"], r["kind"]): r for r in d["rows"]}
    rows = [[f"`{m}`"] + [f"{cell[m, k]['median_s']:.3f}" + (f" ({cell[m, k]['flop_ratio']:.4f})"
                                                           if "flop_ratio" in cell[m, k] else "")
                          if (m, k) in cell and "median_s" in cell[m, k] else "—" for k in kinds] for m in models]
    meta = d["meta"]
    targets = ", ".join(f"{m} under {t:g} s" for m, t in meta["targets_s"].items())
    return (f"**Conversion time** (`benchmarks/convert_time.py`, {meta.get('cpu', meta['machine'])}): median "
            f"seconds of `siftc.convert` over {meta['reps']} runs at sparsity {meta['sparsity']}, "
            f"{meta['threads']} threads, excluding Python start-up, with the converted model's weight FLOPs "
            f"over the dense model's in brackets; `gpt2_small` is HuggingFace's GPT-2 small at its real size "
            f"(124M, random init, sequence 64). Targets: {targets}.\n\n"
            + _table(["model"] + kinds, rows))


def runtime(d) -> str:
    cols = ["dense", "masked", "csr", "sparseprop", "native"]
    rows = []
    for r in d["rows"]:
        for mode in ("fwd", "fwd+bwd"):
            t = r[mode]
            rows.append([r["row"], mode, f"{t['base']:.1f}"] + [_x(t[c] / t["base"]) if c in t else "—" for c in cols])
    res = d.get("resnet")
    if res:
        s = res["step"]
        rows.append([res["row"], "train step", f"{s['base']:.0f}", "—", _x(s["masked"] / s["base"]), "—", "—",
                     _x(s["native"] / s["base"])])
    m, st = d["machine"], d["settings"]
    targets = "\n".join(f"- {'met' if t['met'] else '**missed**'}: {t['target']} (measured {t['value']:.2f}×)"
                        for t in d["targets"])
    roof = d.get("roofline")
    roof_text = ""
    if roof:
        p = roof["passes"]
        roof_text = ("\n\nRoofline of the " + roof["row"] + " (`roofline` in the JSON): native reaches "
                     + ", ".join(f"{k} {v['native_gflops']:.0f}" for k, v in p.items())
                     + " GFLOP/s against the dense GEMM's "
                     + ", ".join(f"{k} {v['dense_gflops']:.0f}" for k, v in p.items())
                     + f" GFLOP/s. Each non-zero costs one multiply-add per batch element on an operand row gathered "
                       f"from cache ({roof['arithmetic_intensity']['native_kernel_flop_per_operand_byte']} FLOP per "
                       f"operand byte, against {roof['arithmetic_intensity']['dense_gemm_flop_per_byte_from_memory']:.0f} "
                       f"for the dense GEMM from memory), so the kernels run at the cache's bandwidth "
                       f"(~{max(v['kernel_operand_gbs'] for v in p.values()):.0f} GB/s of operands), not at the "
                       f"FMA units' rate; the DRAM traffic alone would allow "
                       f"{min(v['dram_ms_at_stream_rate'] for v in p.values()):.0f} ms per pass.")
    return (f"**Sparse training runtime** (`benchmarks/runtime.py`): median ms over {st['reps']} repeats "
            f"({st.get('resnet_reps', st['reps'])} for the ResNet-18 step), columns interleaved in one run; "
            f"{m['cpu']}, {m['threads']} threads, {m['cpu_capability']}, torch {m['torch']}. `base` is the dense "
            f"layer the row is compared with (dense 2048×2048 Linear, batch {st['linear_batch']}; dense 128→128 "
            f"conv, batch {st['conv_batch']}; dense ResNet-18 step); other cells are times relative to it. "
            f"A *Wide* row is the iso-FLOP Sparse Wide layer: its ideal is 1.00×.\n\n"
            + _table(["row", "pass", "base ms"] + cols, rows) + "\n\nTargets (issue 4):\n\n" + targets + roof_text)


def memory(d) -> str:
    """benchmarks/memory.py: dense vs Sparse-IFT rows, each sparse row's ratios to its dense row."""
    mb = lambda b: f"{b / 1e6:,.1f}"
    rows, scale = [], None
    for r in d["rows"].values():
        if r["config"].get("scale"):
            scale = r
            continue
        ratio = r.get("ratios", {})
        cell = lambda key, text: text + (f" ({ratio[key]:.2f}×)" if key in ratio else "")
        rows.append([f"`{r['name']}`", cell("weight_state", mb(r["weight_state"]["total"])),
                     cell("peak_rss", mb(r["peak_rss"])), cell("step_s", f"{r['step_s']:.3g}"),
                     cell("opt_step_s", f"{r['opt_step_s']:.3g}"), cell("checkpoint", mb(r["checkpoint"])),
                     cell("artifact", mb(r["artifact"])),
                     " / ".join("met" if t["met"] else "**missed**" for t in r["targets"].values())
                     if "targets" in r else ""])
    limits = d["settings"]["targets_max_ratio"]
    text = (f"**Memory** (`benchmarks/memory.py`, {d['machine']['cpu']}, {d['machine']['threads']} threads, "
            f"{d['settings']['optimizer']}, {d['settings']['backend']} backend; each row in its own process, "
            f"{d['settings']['statistic']}): weight state = parameters + gradients + optimizer state + positions "
            f"+ the native backend's cached index, in MB; ratios to the row's dense model in brackets. "
            f"Targets: weight state ≤ {limits['weight_state']}×, checkpoint ≤ {limits['checkpoint']}×, "
            f"optimizer step ≤ {limits['opt_step_s']}× (the load average was "
            f"{' / '.join(f'{x:.1f}' for x in d['settings'].get('loadavg_1m_before_after', []))} during the "
            f"run: step times are noisy).\n\n"
            + _table(["configuration", "weight state MB", "peak RSS MB", "step s", "opt step s", "checkpoint MB",
                      "artifact MB", "targets (state / ckpt / opt)"], rows))
    if d.get("note"):
        text += f"\n\nNote: {d['note']}"
    if scale:
        ws = scale["weight_state"]
        text += (f"\n\nScale: one AdamW step of GPT-3 Small Sparse Wide 75% (paper Table 14 shapes, sequence 256, "
                 f"batch 1, native backend) took {scale['step_s']:.1f} s with a peak RSS of {mb(scale['peak_rss'])} MB "
                 f"and {mb(ws['total'])} MB of weight state; with dense-shaped sparse layers the weight state "
                 f"would be {mb(ws['dense_shaped_estimate'])} MB (estimated from the shapes, not allocated).")
    return text


def _bench(name: str):
    """The benchmark script benchmarks/<name>.py as a module (for its constants: what a full run plans)."""
    spec = importlib.util.spec_from_file_location(f"siftc_benchmark_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mean_sd(pair, scale=1.0, digits=4) -> str:
    return f"{scale * pair[0]:.{digits}f} ± {scale * pair[1]:.{digits}f}"


def iso_flop_training(d) -> str:
    """Every row a full run of benchmarks/iso_flop_training.py plans (dense, each kind at each sparsity, the
    Sparse Wide pattern rows) per task, then any other row the JSON holds; a row not in the JSON is
    'not run', a kind that could not convert the model says so, with why below the table."""
    bench = _bench("iso_flop_training")
    planned = [c.name for c in bench.configs()]
    rows, failed = [], []
    for task in dict.fromkeys([*bench.TASKS, *d["tasks"]]):
        got = {c["config"]: c for c in d["tasks"].get(task, [])}
        for name in dict.fromkeys([*planned, *got]):
            c = got.get(name)
            if c is None or "error" in c:
                rows.append([task, name, "not run" if c is None else f"{c['kind']}: could not convert"] + ["—"] * 6)
                if c is not None:
                    failed.append(f"- {task} {name}: {c['error']}")
                continue
            fit, sps = c.get("pattern_fit"), c["steps_per_s"]
            kind = c["kind"] + (f", {fit['as_requested']}/{fit['sparse_layers']} layers `{c['pattern']}`"
                                + (f", {fit['effective_sparsity']:.1%} sparse" if fit.get("effective_sparsity")
                                   is not None else "") if fit else "")
            rows.append([task, name, kind, _mean_sd(c["val_loss"]), _mean_sd(c["val_acc"], 100, 2),
                         f"{sps['native']:.1f}" if "native" in sps else "—", f"{sps['torch']:.1f}",
                         f"{c['train_flops']:.3e}", f"{c['flop_ratio']:.3f}"])
    return (f"**Iso-FLOP training** (`benchmarks/iso_flop_training.py`): dense vs the four Sparse-IFT kinds "
            f"(RigL, unstructured) at {' and '.join(f'{round(100 * s)}%' for s in bench.SPARSITIES)}, and Sparse "
            f"Wide with block patterns, at the same steps, batch and learning rate; mean ± sd over seeds "
            f"{d['seeds']}, {d['threads']} thread, torch {d['torch']}. Steps/s: `native` = siftc's kernels, "
            f"`torch` = masked dense (dense: plain PyTorch). Training FLOPs include RigL's dense-gradient steps. "
            f"— : not measured.\n\n"
            + _table(["task", "config", "kind", "val loss", "val acc %", "steps/s native", "steps/s torch",
                      "train FLOPs", "÷ dense"], rows)
            + ("\n\nNot converted:\n\n" + "\n".join(failed) if failed else ""))


def inference(d) -> str:
    parts = []
    for name, run in d.items():
        frac = {(r["sparsity"], r["engine"]): r.get("supported_fraction") for r in run["results"]}
        rows = []
        for p in run["sweep"]["points"]:
            ms, rel = p["p50_ms"], p["relative"]
            rows.append([p["sparsity"], f"{ms['deepsparse']:.1f}", _x(rel["deepsparse"]),
                         f"{ms['onnxruntime']:.1f}", _x(rel["onnxruntime"]),
                         _x(p["deepsparse_speedup_vs_onnxruntime"]), frac.get((p["sparsity"], "deepsparse"))])
        st = run["settings"]
        parts.append(f"`{Path(run['sweep']['model']).name}`, Sparse Wide, batch {p['batch']}, {st['threads']} "
                     f"threads, {st['turns']} turns × {st['iterations']} calls per engine:\n\n"
                     + _table(["sparsity", "DeepSparse p50 ms", "÷ dense", "ONNX Runtime p50 ms", "÷ dense",
                               "DeepSparse speed-up vs ORT", "DeepSparse supported fraction"], rows))
    return ("**Inference** (`benchmarks/inference.py`, `siftc bench --sweep`): each point converted, exported "
            "and run on DeepSparse and ONNX Runtime with the same inputs, engines in turns; latency relative "
            "to the dense model on the same engine. The iso-FLOP ideal is 1.00×; ONNX Runtime has no sparse "
            "kernels, so it shows the cost without sparsity support.\n\n" + "\n\n".join(parts)
            + "\n\n![latency relative to dense against sparsity](benchmarks/results/inference.png)")


def export_controls(d) -> str:
    rows = [[v["control"], "default" if v["value"] is None else v["value"], f"{v['p50_ms']:.1f}",
             _x(v["ratio_to_defaults"]), f"{v['turns_faster']} of {len(v['turn_ratios'])}", _x(v["relative_to_dense"]),
             v["supported_fraction"]] for v in d["variants"]]
    defaults = ", ".join(f"{k} {v}" for k, v in d["defaults"].items())
    return (f"**Export controls** (`benchmarks/export_controls.py`): the {int(100 * d['sparsity'])}% Sparse Wide "
            f"`{Path(d['model']).name}` on DeepSparse at batch {d['batch']}, each control changed alone from the "
            f"defaults ({defaults}); {d['settings']['turns']} paired turns. The defaults stay where no variant "
            f"was faster.\n\n" + _table(["control", "value", "p50 ms", "÷ defaults (median of turns)",
                                         "turns faster than defaults", "÷ dense", "supported fraction"], rows))


def glance(results: dict) -> str:
    """One line per issue target, computed from the same JSON as the tables."""
    lines = []
    ct = results.get("convert_time")
    if ct:
        for prefix, target in ct["meta"]["targets_s"].items():
            t = [r["median_s"] for r in ct["rows"] if r["model"].startswith(prefix) and "median_s" in r]
            if t:
                lines.append(f"- Conversion of {prefix}: {min(t):.2f}–{max(t):.2f} s per kind (target < "
                             f"{target:g} s: {'met' if max(t) < target else '**missed**'}).")
    rt = results.get("runtime")
    if rt:
        missed = [t for t in rt["targets"] if not t["met"]]
        step = next((t for t in rt["targets"] if "ResNet-18" in t["target"]), None)
        wide = next((t for t in rt["targets"] if t["target"].startswith("Wide Linear s=0.9")), None)
        verdict = lambda t: "met" if t["met"] else "missed"
        lines.append(f"- Sparse training runtime: {len(rt['targets']) - len(missed)} of {len(rt['targets'])} "
                     f"targets met. ResNet-18 Sparse Wide 90% training step {step['value']:.2f}× the dense step "
                     f"(target 3×: {verdict(step)}); iso-FLOP wide 90% Linear fwd+bwd {wide['value']:.2f}× the "
                     f"dense layer (target 2×: {verdict(wide)}). The roofline below says what limits them.")
    inf = results.get("inference")
    if inf and "resnet18" in inf:
        p90 = next(p for p in inf["resnet18"]["sweep"]["points"] if p["sparsity"] == 0.9)
        fr = min(r.get("supported_fraction", 1.0) for r in inf["resnet18"]["results"] if r["engine"] == "deepsparse")
        lines.append(f"- Inference, Sparse Wide 90% ResNet-18 (224×224, batch 64) on DeepSparse: "
                     f"{p90['relative']['deepsparse']:.2f}× the dense model (target ≤ 4.0×), "
                     f"{p90['deepsparse_speedup_vs_onnxruntime']:.2f}× faster than ONNX Runtime on the same file "
                     f"(target ≥ 5.2×, the paper's figure), supported fraction {fr:g} (target 1.0).")
    tr = results.get("iso_flop_training")
    if tr:
        parts = []
        for task, configs in tr["tasks"].items():
            trained = [c for c in configs if "val_loss" in c]  # not the rows of a kind that could not convert
            dense = next((c for c in trained if c["config"] == "dense"), None)
            sparse = [c for c in trained if c["config"] != "dense"]
            if dense is None or not sparse:
                continue
            best = min(sparse, key=lambda c: c["val_loss"][0])
            parts.append(f"{task}: {best['config']} val loss {best['val_loss'][0]:.4f} vs dense "
                         f"{dense['val_loss'][0]:.4f} at {best['flop_ratio']:.3f}× the training FLOPs")
        lines.append("- Iso-FLOP training (mean of seeds): " + "; ".join(parts) + ".")
    return "**At a glance**\n\n" + "\n".join(lines)


def _ratio(cell) -> str:
    return _x(cell) if isinstance(cell, float) else "—"


def patterns_table(results: dict) -> str:
    """One row per pattern: kernel speed (patterns.json, patterns_conv.json), the ResNet-18 training step
    (runtime.json, else runtime_resnet.json: --patterns), DeepSparse (inference_patterns.json), and the
    accuracy of RigL Sparse Wide per task (iso_flop_training.json's pattern rows), all relative to dense."""
    layer_rows = {}  # patterns.json's rows, then patterns_conv.json's (a --no-linear run) where it lacks one
    for name in ("patterns", "patterns_conv"):
        for r in (results.get(name) or {}).get("rows", []):
            layer_rows.setdefault(r["row"], r)
    layer_rows = list(layer_rows.values())
    rt = next((d for d in (results.get("runtime"), results.get("runtime_resnet"))
               if d and d.get("resnet") and len(d["resnet"]["step"]) > 3), None)
    inf, tr = results.get("inference_patterns"), results.get("iso_flop_training")
    step = rt["resnet"]["step"] if rt else {}
    ds = {r["pattern"]: r["relative"] for r in (inf or {}).get("rows", []) if r["engine"] == "deepsparse"}
    acc = {}  # (task, pattern) -> "acc ± sd" at the pattern rows' sparsity
    rows_tr = [(t, c) for t, cs in (tr or {}).get("tasks", {}).items() for c in cs  # Sparse Wide and dense
               if c.get("kind") in ("wide", "dense") and "val_acc" in c]
    s_acc = next((c["sparsity"] for _, c in rows_tr if c.get("pattern", "unstructured") != "unstructured"), None)
    for t, c in rows_tr:
        if c["sparsity"] == s_acc:
            acc[t, c.get("pattern", "unstructured")] = f"{100 * c['val_acc'][0]:.2f} ± {100 * c['val_acc'][1]:.2f}"
        if c["sparsity"] == 0:
            acc[t, "dense"] = f"{100 * c['val_acc'][0]:.2f} ± {100 * c['val_acc'][1]:.2f}"
    tasks = list((tr or {}).get("tasks", {}))
    patterns = ["unstructured"] + list(dict.fromkeys(
        c for r in layer_rows for c in r["fwd+bwd"] if c not in ("base", "masked", "native")))
    seen = list(ds) + [c.removeprefix("native ") for c in step if c.startswith("native ")] + [p for (_, p) in acc]
    patterns += [p for p in dict.fromkeys(seen) if p not in patterns and p != "dense"]  # once each, in order
    linear = [r for r in layer_rows if r.get("kind") == "linear"]
    roof = max(linear, key=lambda r: r.get("sparsity", 0)) if linear else None  # the roofline: useful GFLOP/s

    def gflops(col):
        cell = (roof["fwd+bwd"].get(col) or {}) if roof else {}
        return f"{cell['gflops']:.1f}" if isinstance(cell.get("gflops"), float) else "—"
    header = ([f"{r['row']} fwd+bwd ÷ dense" for r in layer_rows]
              + ([f"{roof['row']} fwd+bwd useful GFLOP/s"] if roof else []) + ["ResNet-18 wide-90% step ÷ dense",
              "DeepSparse wide-90% ResNet-18 ÷ dense"] + [f"{t} val acc % (wide {round(100 * s_acc)}%)"
                                                          for t in tasks if s_acc is not None])
    table = [["dense"] + ["1.00×"] * len(layer_rows) + ([gflops("base")] if roof else []) + ["1.00×"] * 2
             + [acc.get((t, "dense"), "—") for t in tasks if s_acc is not None]]
    for p in patterns:
        col = "native" if p == "unstructured" else p
        table.append([f"`{p}`"] + [_ratio((r["fwd+bwd"].get(col) or {}).get("vs_base")) for r in layer_rows]
                     + ([gflops(col)] if roof else []) + [_ratio(step[c] / step["base"] if isinstance(step.get(c := "native" if p == "unstructured"
                                                                            else f"native {p}"), float) else None),
                        _ratio(ds.get(p))] + [acc.get((t, p), "—") for t in tasks if s_acc is not None])
    step_file = "runtime" if rt is not None and rt is results.get("runtime") else "runtime_resnet"
    sources = [f"`{n}.json`" + ("" if results.get(n) else " (not run)") for n in
               ("patterns", "patterns_conv", step_file, "inference_patterns", "iso_flop_training")]
    machines = sorted({d["machine"]["cpu"] if isinstance(d.get("machine"), dict) else d["machine"]
                       for d in (results.get(n) for n in ("patterns", step_file, "inference_patterns")) if d})
    goals = [g for d in (results.get("patterns"), rt, inf) if d for g in d.get("targets", [])
             if "pattern" in g or "block pattern" in g["target"]]
    goal_text = "\n".join(f"- {'met' if g['met'] else '**missed**'}: {g['target']} ("
                           f"{g.get('pattern') or '—'} {_ratio(g.get('value'))})" for g in goals)
    return (f"**Patterns side by side** (from {', '.join(sources)}; {', '.join(machines) or 'no machine yet'}): "
            f"the iso-FLOP Sparse Wide layer or model per pattern, time relative to its dense base "
            f"(`unstructured`: the native kernels on a random mask); useful GFLOP/s: the non-zeros' FLOPs over "
            f"the time (dense: the dense GEMM's, the roofline the patterns are measured against); accuracy: RigL "
            f"Sparse Wide, mean ± sd over seeds. — : not measured.\n\n" + _table(["pattern"] + header, table)
            + (f"\n\nTargets (issue 13):\n\n{goal_text}" if goals else ""))


SECTIONS = [("convert_time", convert_time), ("runtime", runtime), ("memory", memory),
            ("iso_flop_training", iso_flop_training),
            ("inference", inference), ("export_controls", export_controls)]


def _shown(path: Path) -> str:
    """`path` as the README names it: relative to the checkout when inside it."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def render(results_dir: Path = RESULTS) -> str:
    results = {name: _load(name, results_dir) for name, _ in SECTIONS}
    out = [glance({k: v for k, v in results.items() if v is not None})]
    for name, fn in SECTIONS:
        d = results[name]
        out.append(fn(d) if d is not None else f"**{name}**: no `{_shown(results_dir / name)}.json` yet (not run).")
    return "\n\n".join(out)


PATTERN_RESULTS = ("patterns", "patterns_conv", "runtime", "runtime_resnet", "inference_patterns",
                   "iso_flop_training")


def render_patterns(results_dir: Path = RESULTS) -> str:
    return patterns_table({name: _load(name, results_dir) for name in PATTERN_RESULTS})


def replace_block(src: str, begin: str, end: str, text: str) -> str:
    head, rest = src.split(begin, 1)
    return head + begin + "\n\n" + text + "\n\n" + end + rest.split(end, 1)[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="replace the README block between the markers")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="the folder of result JSON files [default: benchmarks/results]")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        print(f"readme_tables: --results {args.results} is not a folder; pass the folder of the benchmarks' "
              f"JSON files (default benchmarks/results)", file=sys.stderr)
        return 2
    blocks = [(BEGIN, END, render(args.results)), (PATTERNS_BEGIN, PATTERNS_END, render_patterns(args.results))]
    if not args.write:
        print("\n\n".join(text for _, _, text in blocks))
        return 0
    readme = ROOT / "README.md"
    src = readme.read_text()
    for begin, end, _ in blocks:
        if begin not in src or end not in src:
            print(f"readme_tables: README.md lacks the markers {begin!r} ... {end!r}; add them where the "
                  f"table belongs", file=sys.stderr)
            return 2
    for begin, end, text in blocks:
        src = replace_block(src, begin, end, text)
    readme.write_text(src)
    print(f"wrote {len(SECTIONS)} tables and the pattern table into {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
