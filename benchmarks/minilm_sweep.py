"""lam sweep on all-MiniLM-L6-v2: ONNX Runtime speedup (batch 32, seq 128) vs held-out cosine to the dense model.

For every lam of RAMDA and of a baseline solver (ProxGen by default) it runs ``structkit run configs/minilm.yaml``
(distil, prune, refit, export, time, measure), then the Torch-Pruning magnitude reference at the head / FFN sizes
each RAMDA point reached (``model.options.prune_to``: cut by weight magnitude before training, then the same 200
steps of distillation with AdamW). Writes every run folder under ``--out``, a JSON with one summary row per point,
and the curve (speedup at batch 32 vs mean cosine) as a PNG.

    python benchmarks/minilm_sweep.py --out runs/minilm_sweep \\
        --ramda-lams 6e-4 8e-4 --baseline proxgen --baseline-lams ... \\
        --json docs/minilm_sweep.json --png docs/img/minilm_tradeoff.png

Every point is a separate process (``structkit run``), so one point's memory and threads never touch the next; a
point whose report.json has its latency is reused unless ``--force`` (an interrupted point resumes). Settings shared
by all points come from the config plus ``--set`` overrides; per-point settings (solver, lr, lam) from the flags.
``structure.0`` is the heads rule of configs/minilm.yaml, ``structure.1`` the FFN rule.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_point(name: str, config: Path, out: Path, overrides: list[str], force: bool) -> Path:
    folder = out / name
    report = folder / "report.json"
    if report.is_file() and json.loads(report.read_text()).get("latency") and not force:
        print(f"[{name}] reusing {report}", file=sys.stderr, flush=True)
        return folder
    print(f"[{name}] structkit run {config} --out {folder} --set {' '.join(overrides)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "structkit", "run", str(config), "--out", str(folder), "--resume",
                    "--set", *overrides], check=True, cwd=ROOT)
    print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return folder


def row(name: str, folder: Path) -> dict:
    """One summary row from a run folder (report.json and results/compress.json)."""
    report = json.loads((folder / "report.json").read_text())
    comp = json.loads((folder / "results" / "compress.json").read_text())
    cfg, layers = report["config"], report["layers"]
    magnitude = cfg["model"]["options"].get("prune_to") is not None
    heads = [e["after"] for n, e in layers.items() if n.endswith("attention.self")]
    ffn = [e["after"] for n, e in layers.items() if n.endswith("intermediate.dense")]
    q = comp["metrics"]["slim"]
    steps_per_epoch = cfg["data"]["options"]["batches_per_epoch"]
    s = {"name": name, "method": "magnitude" if magnitude else "structured", "solver": cfg["optimizer"]["name"],
         "lam": None if magnitude else cfg["structure"][0]["lam"],
         "ffn_lam": None if magnitude else cfg["structure"][1]["lam"], "lr": cfg["optimizer"]["lr"],
         "heads_kept": heads, "ffn_kept": ffn, "heads_total": sum(heads), "ffn_total": sum(ffn),
         "params": report["params"]["after"], "dense_params": report["params"]["before"],
         "steps": (cfg["schedule"]["epochs"] + cfg["finetune"]["epochs"]) * steps_per_epoch,
         **{k: q[k] for k in ("cosine_mean", "cosine_p5", "retrieval_agreement", "retrieval_dense_nn_in_slim_top5",
                              "pool")},
         "train_seconds": (report["timings"]["train_s"] or 0) + ((comp.get("finetune") or {}).get("seconds") or 0),
         "run_seconds": report["wall_time_s"]}
    for batch, r in (report.get("latency") or {}).items():
        s.update({f"b{batch}_dense_p50_ms": r["dense_p50_ms"], f"b{batch}_slim_p50_ms": r["slim_p50_ms"],
                  f"b{batch}_speedup": r["speedup"]})
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
    """The dense model exported by both torch exporters (the task's export: encoder + pooling, dynamic axes, checked
    at seq 128), timed against each other (same protocol)."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from structkit.config import load_config
    from structkit.deploy import environment, measure_latency
    from structkit.tasks.sentence import SentenceDistillation, _model_path, sentence_encoder
    from structkit.tasks.sentence_data import austen

    torch.set_num_threads(1)
    from transformers import AutoTokenizer
    cfg = load_config(ROOT / "configs" / "minilm.yaml")
    tokenizer, model = AutoTokenizer.from_pretrained(_model_path(None)), sentence_encoder().eval()
    held = austen()[1]
    ex = tokenizer(held[:4], padding=True, truncation=True, max_length=64, return_tensors="pt")
    setup = SimpleNamespace(example_inputs={"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]},
                            splits=SimpleNamespace(info={"held_out_all": held}, tokenizer=tokenizer,
                                                   options=cfg.data.options))
    task = SentenceDistillation()
    make_inputs = task.bench_inputs(setup)
    result, paths = {}, {}
    for exporter in ("torchscript", "dynamo"):
        paths[exporter] = out / f"exporter_{exporter}" / "dense.onnx"
        info = task.export(setup, model, paths[exporter], opset=cfg.deploy.opset, exporter=exporter)
        result[exporter] = {k: info[k] for k in ("bytes", "max_abs_diff", "max_abs_diff_at_seq_len")}
    latency = {}
    for batch, n in ((1, 10 * runs), (32, runs)):
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
    p.add_argument("--ramda-lams", type=float, nargs="+", default=[], help="heads lam (structure.0.lam) of RAMDA")
    p.add_argument("--ramda-lr", type=float, default=None, help="default: the config's optimizer.lr")
    p.add_argument("--ffn-ratio", type=float, default=None,
                   help="FFN lam (structure.1.lam) = ratio x lam (for every solver); default: the config's")
    p.add_argument("--baseline", default="proxgen", choices=["proxgen", "rmda"])
    p.add_argument("--baseline-lams", type=float, nargs="+", default=[])
    p.add_argument("--baseline-lr", type=float, default=1e-4)
    p.add_argument("--baseline-set", nargs="*", default=[], help="extra --set overrides for the baseline only")
    p.add_argument("--magnitude-optimizer", default="adamw")
    p.add_argument("--magnitude-lr", type=float, default=3e-4, help="no milestones (like finetune.lr)")
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
        return [f"structure.1.lam={args.ffn_ratio * lam:g}"] if args.ffn_ratio is not None else []

    rows, ramda_points = [], []
    for lam in args.ramda_lams:
        name = f"ramda_lam{lam:g}"
        sets = common + ["optimizer.name=ramda", f"structure.0.lam={lam:g}", *ffn(lam)]
        if args.ramda_lr is not None:
            sets.append(f"optimizer.lr={args.ramda_lr:g}")
        rows.append(row(name, run_point(name, args.config, args.out, sets, args.force)))
        ramda_points.append(name)
    for lam in args.baseline_lams:
        name = f"{args.baseline}_lam{lam:g}"
        sets = common + [f"optimizer.name={args.baseline}", f"optimizer.lr={args.baseline_lr:g}",
                         f"structure.0.lam={lam:g}", *ffn(lam)]
        if args.baseline == "proxgen":
            sets.append("optimizer.momentum=null")  # ProxGen has betas, not an averaging momentum
        rows.append(row(name, run_point(name, args.config, args.out, sets + list(args.baseline_set), args.force)))
    if not args.no_magnitude:
        for src in ramda_points:
            name = f"magnitude_like_{src}"
            # the same 200 steps (40 epochs of 5) and sentences, no regularizer, nothing left to fine-tune
            sets = common + [f"model.options.prune_to={args.out / src}", "structure.0.lam=0", "structure.1.lam=0",
                             f"optimizer.name={args.magnitude_optimizer}", f"optimizer.lr={args.magnitude_lr:g}",
                             "optimizer.momentum=null", "optimizer.milestones=[]", "schedule.epochs=40",
                             "finetune.epochs=0"]
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
