"""The run report: ``report.json`` (machine-readable), ``report.md`` (tables) and PNG plots, built from what the
pipeline stages left in the output folder (``results/*.json``, ``metrics.jsonl``, ``config.yaml``,
``run_info.json``). A stage that has not run yet leaves its fields ``null``.

``report.json`` fields (accuracies are fractions in [0, 1])::

    metric     the lead metric of the task ("accuracy"; causal_lm: "perplexity"; sentence_distillation: "cosine_mean")
    <metric>   {trained, slim, val_final}         its test value for the trained and slim models
    sparsity   {weighted_group_sparsity, lowrank_level, unstructured_sparsity, zero_groups, num_groups}
    params     {before, after}                     macs {before, after} (per example)
    verify     {max_abs_diff_torch, tolerance_torch, max_abs_diff_onnx, onnx: {dense, slim}}
    latency    {"<batch>": {dense_p50_ms, slim_p50_ms, dense_p90_ms, slim_p90_ms, speedup, settings, ...}}
    latency_protocol, layers, prune, solver, training, timings, wall_time_s, environment, config, git, versions
    warnings   [str]                               e.g. layer collapse (every group of a layer exactly zero)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["build_report", "write_report_files", "render_markdown", "summary_line"]


def build_report(folder) -> dict[str, Any]:
    """Collect the report of the run folder ``folder`` (a :class:`structkit.pipeline.RunFolder`)."""
    import yaml

    path = folder.path
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else None
    info = json.loads((path / "run_info.json").read_text()) if (path / "run_info.json").is_file() else {}
    history = _history(path / "metrics.jsonl")
    train, comp, exp, bench = (folder.result(s) for s in ("train", "compress", "export", "bench"))
    prune = (comp or {}).get("prune") or {}
    final = history[-1] if history else {}
    onnx = {name: exp[name]["max_abs_diff"] for name in ("dense", "slim")} if exp else None
    latency = {k: v for k, v in (bench or {}).get("latency", {}).items() if k != "protocol"} or None
    timings = {"train_s": (train or {}).get("seconds"), "compress_s": (comp or {}).get("seconds"),
               "export_s": (exp or {}).get("seconds"), "bench_s": (bench or {}).get("seconds")}
    sparsity = (comp or {}).get("sparsity") or ({k: final.get(k) for k in (
        "weighted_group_sparsity", "lowrank_level", "unstructured_sparsity", "zero_groups", "num_groups")}
        if final else None)
    metric = (comp or {}).get("metric") or _metric_of(config)
    return {
        "metric": metric,
        metric: {"trained": _get(comp, metric, "trained"), "slim": _get(comp, metric, "slim"),
                 "slim_pruned": _get(comp, metric, "slim_pruned"), "projected": _get(comp, metric, "projected"),
                 "val_final": final.get(f"val_{metric}")},
        "finetune": {k: v for k, v in ((comp or {}).get("finetune") or {}).items() if k != "history"} or None,
        "target": (comp or {}).get("target"),
        "sparsity": sparsity,
        "params": {"before": prune.get("params_before"), "after": prune.get("params_after")},
        "macs": {"before": prune.get("macs_before"), "after": prune.get("macs_after")},
        "verify": {"max_abs_diff_torch": prune.get("verify_max_abs_diff"),
                   "tolerance_torch": prune.get("verify_tolerance"),
                   "max_abs_diff_onnx": max(onnx.values()) if onnx else None, "onnx": onnx},
        "latency": latency,
        "latency_protocol": (bench or {}).get("latency", {}).get("protocol"),
        "layers": prune.get("layers"),  # widths, params and MACs per example, per layer
        "prune": {"round_to": prune.get("round_to"), "skipped": prune.get("skipped")} if prune else None,
        "solver": (train or {}).get("solver"),
        "training": {"epochs": len(history), "final": final or None},
        "timings": timings,
        "wall_time_s": sum(v for v in timings.values() if v is not None),
        "environment": (bench or {}).get("environment"),
        "config": config,
        "git": info.get("git"),
        "versions": info.get("versions"),
        "warnings": collapse_warnings(comp),
    }


def collapse_warnings(compress: dict | None) -> list[str]:
    """A warning per layer whose every group the regularizer zeroed (layer collapse): prune keeps one (zero)
    group so the network still runs, but that layer then passes nothing on."""
    out = []
    for name, e in ((compress or {}).get("layers") or {}).items():
        if e.get("total") and e.get("kept") == 0:
            out.append(f"layer collapse: every one of the {e['total']} {e.get('unit', 'groups')} of {name} is exactly "
                       f"zero, so the layer passes nothing on; prune kept one zero group so the model still runs. "
                       f"Lower the lam of the structure rule that selects {name} (or exclude it).")
    return out


def _metric_of(config: dict | None) -> str:
    """The lead metric of the config's task (``accuracy`` for classification)."""
    from .tasks import get_task
    try:
        return get_task((config or {}).get("task") or "classification").primary_metric
    except (ValueError, ImportError):
        return "accuracy"


def _get(data: dict | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report_files(folder, report: dict[str, Any]) -> None:
    """Write report.json, report.md and the plots (training.png, layers.png, latency.png) atomically."""
    from ._io import write_json, write_text
    history = _history(folder.path / "metrics.jsonl")
    plots = _plots(folder, report, history)
    write_json(folder.path / "report.json", report)
    write_text(folder.path / "report.md", render_markdown(report, history, plots))


# ------------------------------------------------------------------------------------------------ markdown

def _num(value: Any, fmt: str = "{:,}") -> str:
    return "–" if value is None else fmt.format(value)


def _ratio(before: Any, after: Any) -> str:
    return f"{before / after:.2f}x fewer" if before and after else "–"


def render_markdown(report: dict[str, Any], history: list[dict[str, Any]], plots: list[str] = ()) -> str:
    """report.md: summary, verification, per-layer widths, latency, training, solver, environment."""
    cfg = report.get("config") or {}
    m = report.get("metric", "accuracy")
    acc, params, macs, verify = report[m], report["params"], report["macs"], report["verify"]
    sp = report.get("sparsity") or {}
    lines = [f"# structkit report: {_get(cfg, 'model', 'name') or '?'} on {_get(cfg, 'data', 'name') or '?'}, "
             f"solver {_get(cfg, 'optimizer', 'name') or '?'}", ""]
    lines += ["| | trained (dense) | slim | |", "|---|---|---|---|",
              f"| test {m} | {_num(acc['trained'], '{:.4f}')} | {_num(acc['slim'], '{:.4f}')} | |",
              f"| parameters | {_num(params['before'])} | {_num(params['after'])} | "
              f"{_ratio(params['before'], params['after'])} |",
              f"| MACs per example | {_num(macs['before'])} | {_num(macs['after'])} | "
              f"{_ratio(macs['before'], macs['after'])} |"]
    for batch, row in (report.get("latency") or {}).items():
        lines.append(f"| ORT latency p50, batch {batch} (ms) | {row['dense_p50_ms']:.3f} | {row['slim_p50_ms']:.3f} | "
                     f"speedup **{row['speedup']:.2f}x** |")
    lines += ["", f"Weighted group sparsity {_num(sp.get('weighted_group_sparsity'), '{:.4f}')}; "
                  f"{_num(sp.get('zero_groups'))} of {_num(sp.get('num_groups'))} groups exactly zero; "
                  f"validation {m} after the last epoch {_num(acc.get('val_final'), '{:.4f}')}.", ""]
    if report.get("target"):
        t = report["target"]
        lines += [f"Target: {t['metric']} ratio {t['target']:.3f} of the dense model; reached **{t['reached']:.3f}** "
                  f"({'within' if t['within_tolerance'] else 'NOT within'} tolerance). {t['exact_zero_groups']} groups "
                  f"were exactly zero after training; {t['added_groups']} more were removed (largest RMS "
                  f"{t['added_max_rms']:.3g})" + (f", which changed the test {m} from "
                  f"{_num(acc.get('trained'), '{:.4f}')} to {_num(acc.get('projected'), '{:.4f}')} before "
                  "fine-tuning" if acc.get("projected") is not None else "") + "."
                  + (f" Note: {t['note']}." if t.get("note") else ""), ""]
    if report.get("finetune"):
        ft = report["finetune"]
        lines += [f"The slim model was fine-tuned for {ft['epochs']} epoch(s)"
                  + (" with distillation from the dense model" if ft.get("distill") else "")
                  + f" after pruning ({ft['budget_epochs']} epochs in all); its test {m} before fine-tuning, "
                  f"verified equal to the trained model's function, was {_num(acc.get('slim_pruned'), '{:.4f}')}.",
                  ""]
    if report.get("warnings"):
        lines += ["## Warnings", "", *[f"- **warning**: {w}" for w in report["warnings"]], ""]
    onnx = verify.get("onnx") or {}
    lines += ["## Verification", "",
              f"- slim vs trained (torch, eval mode): max |diff| {_num(verify['max_abs_diff_torch'], '{:.3g}')} "
              f"(tolerance {_num(verify.get('tolerance_torch'), '{:.3g}')})",
              f"- ONNX Runtime vs torch: dense {_num(onnx.get('dense'), '{:.3g}')}, slim {_num(onnx.get('slim'), '{:.3g}')}",
              ""]
    if report.get("layers"):
        lines += ["## Per-layer widths", "", "| layer | unit | before | after | removed groups |", "|---|---|---|---|---|"]
        for name, e in report["layers"].items():
            lines.append(f"| {name} | {e.get('unit', '')} | {e.get('before')} | {e.get('after')} | "
                         f"{e.get('removed_groups')} / {e.get('total_groups')} |")
        skipped = (report.get("prune") or {}).get("skipped") or []
        if (report.get("prune") or {}).get("round_to"):
            lines += ["", f"Widths rounded up to multiples of {report['prune']['round_to']} (zero channels kept)."]
        lines += [f"- kept: {s['module']}: {s['reason']}" for s in skipped]
        lines.append("")
    if report.get("latency"):
        proto = report.get("latency_protocol") or {}
        lines += ["## Latency (ONNX Runtime, CPU)", "",
                  "| batch | dense p50 ms | slim p50 ms | dense p90 ms | slim p90 ms | speedup (dense p50 / slim p50) "
                  "| ORT graph optimization |",
                  "|---|---|---|---|---|---|---|"]
        for batch, row in report["latency"].items():
            settings = ", ".join(f"{k}: {v}" for k, v in (row.get("settings") or {}).items())
            lines.append(f"| {batch} | {row['dense_p50_ms']:.3f} | {row['slim_p50_ms']:.3f} | {row['dense_p90_ms']:.3f} | "
                         f"{row['slim_p90_ms']:.3f} | {row['speedup']:.2f}x | {settings} |")
        env = report.get("environment") or {}
        lines += ["", f"Protocol: one process, {proto.get('threads')} intra-op threads for both models (no spinning), "
                      f"{proto.get('warmup')} warm-up and {proto.get('runs')} timed runs per model and batch, dense and "
                      f"slim interleaved; graph optimization `{proto.get('graph_optimization')}` (each model at its "
                      f"faster of ORT_ENABLE_ALL / ORT_ENABLE_EXTENDED when `fastest`).",
                  f"Machine: {env.get('cpu')}, {env.get('logical_cores')} logical cores; onnxruntime "
                  f"{env.get('onnxruntime')}, torch {env.get('torch')}.", ""]
    if history:
        lines += ["## Training", "", f"| epoch | train loss | val {m} | WGS | zero groups | mean inner iters | lr | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in history:
            lines.append(f"| {r['epoch']} | {r['train_loss']:.4f} | {_num(r.get(f'val_{m}'), '{:.4f}')} | "
                         f"{_num(r.get('weighted_group_sparsity'), '{:.4f}')} | {r.get('zero_groups')} / {r.get('num_groups')} | "
                         f"{_num(r.get('mean_inner_iters'), '{:.2f}')} | {r['lr']:.3g} | {r['epoch_seconds']:.1f} |")
        lines.append("")
    solver = report.get("solver") or {}
    if solver:
        hp = ", ".join(f"{k}={v}" for k, v in (solver.get("hyperparameters") or {}).items())
        inner = (f"mean {solver['mean_inner_iters']:.2f} / max {solver['max_inner_iters']} inner iterations over "
                 f"{solver['pg_solves']} inexact subproblem solves" if solver["pg_solves"] else
                 "every subproblem solved in closed form (no inner iterations)")
        lines += [f"Solver {solver['name']} ({hp}; milestones {solver.get('milestones')}, gamma {solver.get('gamma')}): "
                  f"{inner}.", ""]
    t = report.get("timings") or {}
    lines += [f"Wall time {report['wall_time_s']:.1f} s (train {_num(t.get('train_s'), '{:.1f}')} s, compress "
              f"{_num(t.get('compress_s'), '{:.1f}')} s, export {_num(t.get('export_s'), '{:.1f}')} s, bench "
              f"{_num(t.get('bench_s'), '{:.1f}')} s).", ""]
    git = report.get("git") or {}
    if git:
        lines += [f"Code: git commit {git.get('commit')}{' (with uncommitted changes)' if git.get('dirty') else ''}.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines).rstrip() + "\n"


def summary_line(report: dict[str, Any]) -> str:
    """One line for the end of ``structkit run`` (printed even with --quiet)."""
    m = report.get("metric", "accuracy")
    acc, params, macs = report[m], report["params"], report["macs"]
    parts = [f"test {m} {_num(acc['trained'], '{:.4f}')} -> slim {_num(acc['slim'], '{:.4f}')}",
             f"params {_num(params['before'])} -> {_num(params['after'])}",
             f"MACs {_num(macs['before'])} -> {_num(macs['after'])}"]
    latency = report.get("latency") or {}
    if latency:
        parts.append("speedup " + ", ".join(f"{row['speedup']:.2f}x @ batch {b}" for b, row in latency.items()))
    parts.append(f"{report['wall_time_s']:.0f} s")
    return "structkit: " + "; ".join(parts)


# ------------------------------------------------------------------------------------------------ plots

def _plots(folder, report: dict[str, Any], history: list[dict[str, Any]]) -> list[str]:
    """Draw what the data allow; return the file names (relative to the folder)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ._io import atomic_write
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        atomic_write(folder.path / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        made.append(name)

    if history:
        epochs = [r["epoch"] for r in history]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        axes[0].plot(epochs, [r["train_loss"] for r in history], marker="o")
        axes[0].set(title="training loss", xlabel="epoch")
        m = report.get("metric", "accuracy")
        axes[1].plot(epochs, [r.get(f"val_{m}", float("nan")) for r in history], marker="o", color="tab:green")
        axes[1].set(title=f"validation {m}", xlabel="epoch")
        wgs = [r.get("weighted_group_sparsity") for r in history]
        axes[2].plot(epochs, [w if w is not None else float("nan") for w in wgs], marker="o", color="tab:red")
        axes[2].set(title="weighted group sparsity", xlabel="epoch", ylim=(0, 1))
        for ax in axes:
            ax.grid(alpha=0.3)
        save(fig, "training.png")
    layers = report.get("layers") or {}
    if layers:
        names = list(layers)
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 3.6))
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [layers[n]["before"] for n in names], width=0.4, label="dense", color="tab:gray")
        ax.bar([i + 0.2 for i in x], [layers[n]["after"] for n in names], width=0.4, label="slim", color="tab:blue")
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.set(ylabel="width (kept channels)", title="per-layer width")
        ax.legend()
        save(fig, "layers.png")
    latency = report.get("latency") or {}
    if latency:
        batches = list(latency)
        fig, axes = plt.subplots(1, len(batches), figsize=(3.2 * len(batches) + 1, 3.4), squeeze=False)
        for ax, b in zip(axes[0], batches):
            row = latency[b]
            ax.bar(["dense", "slim"], [row["dense_p50_ms"], row["slim_p50_ms"]], color=["tab:gray", "tab:blue"],
                   yerr=[[0, 0], [row["dense_p90_ms"] - row["dense_p50_ms"], row["slim_p90_ms"] - row["slim_p50_ms"]]],
                   capsize=4)
            ax.set(title=f"batch {b}: {row['speedup']:.2f}x", ylabel="ms (p50, bar to p90)")
        save(fig, "latency.png")
    return made
