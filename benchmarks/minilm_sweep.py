"""lam sweep on all-MiniLM-L6-v2: ONNX Runtime speedup (batch 32, seq 128) vs held-out cosine to the dense model.

For every lam of RAMDA and of a baseline solver (ProxGen by default) it runs ``structkit.distill`` (distil, prune,
export, time, measure), then the Torch-Pruning magnitude reference at the head / FFN sizes each RAMDA point reached
(same distillation budget after pruning). Writes every report under ``--out``, a JSON with one summary row per
point, and the curve (speedup at batch 32 vs mean cosine) as a PNG.

    python benchmarks/minilm_sweep.py --out runs/minilm_sweep \\
        --ramda-lams 4e-5 8e-5 1.6e-4 3.2e-4 --baseline proxgen --baseline-lams ... \\
        --json docs/minilm_sweep.json --png docs/img/minilm_tradeoff.png

Every point is a separate process (``python -m structkit.distill``), so one point's memory and threads never
touch the next; a point whose report.json exists is reused unless ``--force``. Settings shared by all points come
from the config (``configs/minilm.yaml``) plus ``--set`` overrides; per-point settings (solver, lr, lam) from the
flags.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_point(name: str, config: Path, out: Path, overrides: list[str], force: bool) -> dict:
    folder = out / name
    report = folder / "report.json"
    if report.is_file() and not force:
        print(f"[{name}] reusing {report}", file=sys.stderr, flush=True)
        return json.loads(report.read_text())
    print(f"[{name}] python -m structkit.distill {config} --out {folder} --set {' '.join(overrides)}",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "structkit.distill", str(config), "--out", str(folder), "--set",
                    *overrides], check=True, cwd=ROOT)
    print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(report.read_text())


def row(name: str, report: dict) -> dict:
    s = dict(report["summary"])
    s["name"] = name
    s["ffn_lam"] = report["config"]["structure"]["ffn_lam"] if report["method"] == "structured" else None
    s["lr"] = report["config"]["optimizer"]["lr"]
    s["steps"] = report["config"]["train"]["steps"]
    s["dense_params"] = report["dense"]["params"]
    s["retrieval_dense_nn_in_slim_top5"] = report["quality"]["retrieval_dense_nn_in_slim_top5"]
    s["pool"] = report["quality"]["pool"]
    s["run_seconds"] = report["seconds"]
    if "quality_before_training" in report:
        s["cosine_mean_before_distillation"] = report["quality_before_training"]["cosine_mean"]
    return s


def markdown_table(rows: list[dict]) -> str:
    """The docs/minilm.md table: one line per operating point."""
    head = ("| point | solver | lam heads / FFN | heads kept per layer | FFN kept per layer | params | "
            "b1 p50 dense / slim ms | b1 speedup | b32 p50 dense / slim ms | b32 speedup | cosine mean | cosine p5 | "
            "retrieval agreement | train time |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        solver = "magnitude (Torch-Pruning) + AdamW" if r["method"] == "magnitude" else \
            {"ramda": "RAMDA", "proxgen": "ProxGen", "rmda": "RMDA"}.get(r["solver"], r["solver"])
        lam = f"{r['lam']:.2g} / {r['ffn_lam']:.2g}" if r.get("lam") is not None else f"sizes of {r['sizes_from']}"
        lines.append(
            f"| {r['name']} | {solver} | {lam} | {' '.join(map(str, r['heads_kept']))} ({r['heads_total']}/72) | "
            f"{' '.join(map(str, r['ffn_kept']))} ({r['ffn_total']}/9216) | {r['params'] / 1e6:.2f}M | "
            f"{r['b1_dense_p50_ms']:.1f} / {r['b1_slim_p50_ms']:.1f} | {r['b1_speedup']:.2f}x | "
            f"{r['b32_dense_p50_ms']:.0f} / {r['b32_slim_p50_ms']:.0f} | **{r['b32_speedup']:.2f}x** | "
            f"**{r['cosine_mean']:.4f}** | {r['cosine_p5']:.4f} | {r['retrieval_agreement']:.3f} | "
            f"{r['train_seconds']:.0f} s |")
    return "\n".join(lines)


def compare_exporters(out: Path, runs: int, warmup: int) -> dict:
    """The dense model exported by both torch exporters, timed against each other (same protocol, seq 128)."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    from structkit import distill
    from structkit.deploy import environment, measure_latency

    torch.set_num_threads(1)
    path = distill._default_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    train, held = distill._austen()
    ex = tokenizer(held[:4], padding=True, truncation=True, max_length=64, return_tensors="pt")
    example = {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]}
    rows = distill._latency_inputs(tokenizer, held, 128, 8)
    result = {}
    for exporter in ("torchscript", "dynamo"):
        dep = distill.validate_config({"deploy": {"exporter": exporter, "batch_sizes": [1], "runs": 1,
                                                  "warmup": 0, "keep_onnx": True}})["deploy"]
        folder = out / f"exporter_{exporter}"
        folder.mkdir(parents=True, exist_ok=True)
        info = distill.export_and_time(model, model, folder, dep, example, rows)
        result[exporter] = {k: info["dense"][k] for k in ("bytes", "max_abs_diff", "max_abs_diff_at_seq_len",
                                                          "seconds")}
    paths = {e: out / f"exporter_{e}" / "dense.onnx" for e in ("torchscript", "dynamo")}
    latency = {}
    for batch, n in ((1, 10 * runs), (32, runs)):
        def make_inputs(b: int) -> dict:
            import numpy as np
            return {k: np.ascontiguousarray(np.concatenate([v] * (b // len(v) + 1))[:b]) for k, v in rows.items()}
        latency[str(batch)] = measure_latency(paths, make_inputs, (batch,), warmup=warmup, runs=n)[str(batch)]
    result["latency"] = latency
    result["environment"] = environment()
    return result


def plot(rows: list[dict], path: Path, target: tuple[float, float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"ramda": ("RAMDA (structkit)", "o", "C0"), "magnitude": ("Torch-Pruning magnitude + distillation",
                                                                         "s", "C2")}
    fig, ax = plt.subplots(figsize=(7, 4.6))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = "magnitude" if r["method"] == "magnitude" else r["solver"]
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        label, marker, color = styles.get(key, (key.upper() if key != "proxgen" else "ProxGen", "^", "C1"))
        rs = sorted(rs, key=lambda r: r["cosine_mean"])
        ax.plot([r["cosine_mean"] for r in rs], [r["b32_speedup"] for r in rs], marker=marker, color=color,
                label=label, linestyle="-" if key != "magnitude" else "--")
        for r in rs:
            if r.get("lam") is not None:
                ax.annotate(f"{r['lam']:.2g}", (r["cosine_mean"], r["b32_speedup"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=color)
    ax.axvline(target[0], color="grey", lw=0.8, ls=":")
    ax.axhline(target[1], color="grey", lw=0.8, ls=":")
    ax.annotate("target", (target[0], target[1]), textcoords="offset points", xytext=(4, -12), fontsize=8,
                color="grey")
    ax.set_xlabel("mean cosine slim vs dense embedding (held-out Austen sentences)")
    ax.set_ylabel("ONNX Runtime speedup, batch 32 x seq 128 (p50)")
    ax.set_title("all-MiniLM-L6-v2: heads + FFN neurons removed (labels: lam)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "minilm.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "minilm_sweep")
    p.add_argument("--ramda-lams", type=float, nargs="+", default=[], help="structure.lam values for RAMDA")
    p.add_argument("--ramda-lr", type=float, default=None, help="default: the config's optimizer.lr")
    p.add_argument("--ffn-ratio", type=float, default=None,
                   help="structure.ffn_lam = ratio x lam (for every solver); default: the config's ffn_lam rule")
    p.add_argument("--baseline", default="proxgen", choices=["proxgen", "rmda"])
    p.add_argument("--baseline-lams", type=float, nargs="+", default=[])
    p.add_argument("--baseline-lr", type=float, default=1e-4)
    p.add_argument("--baseline-set", nargs="*", default=[], help="extra --set overrides for the baseline only")
    p.add_argument("--magnitude-optimizer", default="adamw")
    p.add_argument("--magnitude-lr", type=float, default=3e-4, help="constant (no milestones), like finetune.lr")
    p.add_argument("--no-magnitude", action="store_true")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="overrides for every point")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "minilm_sweep.json")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "minilm_tradeoff.png")
    p.add_argument("--force", action="store_true", help="rerun points whose report.json exists")
    p.add_argument("--table", action="store_true", help="only print the markdown table of an existing --json")
    p.add_argument("--compare-exporters", action="store_true",
                   help="only time the dense model as exported by torchscript vs dynamo; adds it to --json")
    args = p.parse_args(argv)
    if args.compare_exporters:
        data = json.loads(args.json.read_text()) if args.json.is_file() else {}
        data["exporters"] = compare_exporters(args.out, runs=15, warmup=3)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(json.dumps(data["exporters"]["latency"], indent=1))
        return 0
    if args.table:
        print(markdown_table(json.loads(args.json.read_text())["points"]))
        return 0

    t0 = time.perf_counter()
    common = list(args.overrides)

    def ffn(lam: float) -> list[str]:
        return [f"structure.ffn_lam={args.ffn_ratio * lam:g}"] if args.ffn_ratio is not None else []

    rows, ramda_points = [], []
    for lam in args.ramda_lams:
        name = f"ramda_lam{lam:g}"
        sets = common + ["method=structured", "optimizer.name=ramda", f"structure.lam={lam:g}", *ffn(lam)]
        if args.ramda_lr is not None:
            sets.append(f"optimizer.lr={args.ramda_lr:g}")
        rows.append(row(name, run_point(name, args.config, args.out, sets, args.force)))
        ramda_points.append(name)
    for lam in args.baseline_lams:
        name = f"{args.baseline}_lam{lam:g}"
        sets = common + ["method=structured", f"optimizer.name={args.baseline}", f"optimizer.lr={args.baseline_lr:g}",
                         f"structure.lam={lam:g}", *ffn(lam)]
        if args.baseline == "proxgen":
            sets.append("optimizer.momentum=null")  # ProxGen has betas, not an averaging momentum
        rows.append(row(name, run_point(name, args.config, args.out, sets + list(args.baseline_set), args.force)))
    if not args.no_magnitude:
        for src in ramda_points:
            name = f"magnitude_like_{src}"
            sets = common + ["method=magnitude", f"magnitude.from_report={args.out / src / 'report.json'}",
                             f"optimizer.name={args.magnitude_optimizer}", f"optimizer.lr={args.magnitude_lr:g}",
                             "optimizer.momentum=null", "optimizer.milestones=[]"]
            r = row(name, run_point(name, args.config, args.out, sets, args.force))
            r["sizes_from"] = src
            rows.append(r)
    from structkit.deploy import environment
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    result = {**({"exporters": previous["exporters"]} if "exporters" in previous else {}), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv, "config": str(args.config),
              "environment": environment(), "seconds": time.perf_counter() - t0, "points": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.png, (0.95, 1.5))
    print(f"wrote {args.json} and {args.png}", file=sys.stderr)
    for r in rows:
        print(f"{r['name']:<32} heads {r['heads_total']:>2} ffn {r['ffn_total']:>5} params {r['params']:>10,} "
              f"b1 {r.get('b1_speedup', float('nan')):.2f}x b32 {r.get('b32_speedup', float('nan')):.2f}x "
              f"cos {r['cosine_mean']:.4f} p5 {r['cosine_p5']:.4f} retr {r['retrieval_agreement']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
