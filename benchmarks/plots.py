"""Plots of the vision benchmark (``benchmarks/compare_solvers.py`` JSON) into docs/img/:

- ``bench_acc_vs_wgs.png``: test accuracy vs weighted group sparsity, one marker per (solver, lam, seed) run, lines
  joining each solver's lam sweep (seed 0) -- the accuracy/structure trade-off per solver;
- ``bench_acc_vs_latency.png``: test accuracy vs ONNX Runtime latency of the slim model relative to the dense one
  (p50, measured interleaved; batch 64 and batch 1);
- ``bench_curves.png``: validation accuracy and WGS per epoch (seed 0) for every run of the sweep.

    python benchmarks/plots.py --json benchmarks/results/compare_solvers.json --out docs/img \
        --extra benchmarks/results/compare_lam0.json benchmarks/results/compare_lam1e-3.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"ramda": "tab:red", "rmda": "tab:blue", "proxgen": "tab:green", "proxsgd": "tab:purple",
          "adamw": "black", "torch_pruning": "tab:orange"}


def _solver(key: str) -> str:
    return key.split("_lam")[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="benchmarks/results/compare_solvers.json")
    p.add_argument("--out", default="docs/img")
    p.add_argument("--prefix", default="bench", help="file names: PREFIX_acc_vs_wgs.png etc.")
    p.add_argument("--extra", nargs="*", default=[], help="more compare_solvers JSONs (extra lam points) whose "
                                                          "runs are added to the accuracy-vs-WGS and latency plots")
    args = p.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    for path in args.extra:
        for key, per_seed in json.loads(Path(path).read_text())["runs"].items():
            if key != "adamw":
                data["runs"].setdefault(key, {}).update(per_seed)
    out, prefix = Path(args.out), args.prefix
    out.mkdir(parents=True, exist_ok=True)
    runs = data["runs"]
    tp = dict(data.get("torch_pruning") or {})
    for key, per_seed in (data.get("torch_pruning_matched") or {}).items():
        tp.update({f"{key}_{s}": r for s, r in per_seed.items()})

    # accuracy vs WGS
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for solver in ("ramda", "rmda", "proxgen", "proxsgd", "adamw"):
        keys = sorted((k for k in runs if _solver(k) == solver), key=lambda k: float(k.split("_lam")[1])
                      if "_lam" in k else 0.0)
        pts = [(runs[k]["0"]["wgs"] or 0.0, runs[k]["0"]["test_accuracy"]) for k in keys if "0" in runs[k]]
        if pts:
            ax.plot(*zip(*pts), "-o", color=COLORS[solver], label=solver)
        extra = [(r["wgs"] or 0.0, r["test_accuracy"]) for k in keys for s, r in runs[k].items() if s != "0"]
        if extra:
            ax.plot(*zip(*extra), "x", color=COLORS[solver])
    ax.set_xlabel("weighted group sparsity (channels)")
    ax.set_ylabel("test accuracy (slim model)")
    ax.set_title("Fashion-MNIST CNN: accuracy vs structure\n(o: seed 0 lam sweep, x: other seeds at the chosen lam)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}_acc_vs_wgs.png", dpi=120)
    plt.close(fig)

    # accuracy vs ORT latency
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, batch in zip(axes, ("64", "1")):
        for key, per_seed in runs.items():
            for r in per_seed.values():
                lat = (r.get("latency") or {}).get(batch)
                if lat:
                    rel = lat["slim_p50_ms"] / lat["dense_p50_ms"] if _solver(key) != "adamw" else 1.0
                    ax.plot(rel, r["test_accuracy"], "o", color=COLORS[_solver(key)], alpha=0.8)
        for r in tp.values():
            lat = r["latency"].get(batch)
            if lat:
                ax.plot(lat["slim_p50_ms"] / lat["dense_p50_ms"], r["test_accuracy"], "s",
                        color=COLORS["torch_pruning"])
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_xlabel(f"ORT p50 latency relative to the dense model, batch {batch}")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="s" if s == "torch_pruning" else "o", ls="", color=c, label=s)
               for s, c in COLORS.items()]
    axes[0].legend(handles=handles, fontsize=7)
    fig.suptitle("accuracy vs ORT latency of the slim model / the dense model, measured interleaved in one process\n"
                 "(absolute times moved 3x with other jobs' load on this shared machine; AdamW: the dense model, 1.0)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}_acc_vs_latency.png", dpi=120)
    plt.close(fig)

    # training curves (seed 0)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for key, per_seed in sorted(runs.items()):
        r = per_seed.get("0")
        if not r:
            continue
        ep = [c["epoch"] for c in r["curve"]]
        lams = data["args"]["lams"]
        style = "-" if key == "adamw" or (("_lam" in key) and float(key.split("_lam")[1]) == min(lams)) else \
            "--" if "_lam" in key and float(key.split("_lam")[1]) == max(lams) else ":"
        axes[0].plot(ep, [c["val_accuracy"] for c in r["curve"]], style, color=COLORS[_solver(key)], label=key)
        axes[1].plot(ep, [c["weighted_group_sparsity"] or 0.0 for c in r["curve"]], style,
                     color=COLORS[_solver(key)], label=key)
    axes[0].set_ylabel("validation accuracy")
    axes[1].set_ylabel("weighted group sparsity")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    fig.suptitle("training curves, seed 0 (solid: lam 5e-4, dashed: 2e-3, dotted: extra lam points 0 and 1e-3)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}_curves.png", dpi=120)
    plt.close(fig)
    print("wrote", *(out / f"{prefix}_{n}.png" for n in ("acc_vs_wgs", "acc_vs_latency", "curves")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
