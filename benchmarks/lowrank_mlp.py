"""Low rank: the RAMDA paper's 7-layer MLP (``mlp7``) on Fashion-MNIST with the nuclear norm on every hidden
Linear weight (``kind: lowrank``), trained with RAMDA, RMDA, ProxGen, ProxSGD and dense momentum SGD (MSGD),
each through ``structkit.pipeline.run`` (train -> factorize the low-rank matrices, verified -> ONNX -> ORT).

Reported next to the paper's numbers (test accuracy % / low-rank level %):
MSGD 89.95; ProxSGD 87.54/78.00; ProxGen 86.66/87.46; RMDA 88.19/91.88; RAMDA 87.99/89.59.

    python benchmarks/lowrank_mlp.py --json benchmarks/results/lowrank_mlp.json
    python benchmarks/lowrank_mlp.py --quick
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.defaults import MSGD, SOLVERS as STRUCTURED  # noqa: E402  (after the sys.path line)

PAPER = {"sgd": (89.95, None), "proxsgd": (87.54, 78.00), "proxgen": (86.66, 87.46), "rmda": (88.19, 91.88),
         "ramda": (87.99, 89.59)}
SOLVERS = {**STRUCTURED, "sgd": MSGD}


def config(args, solver: str, seed: int) -> dict:
    opt = {"name": solver, **SOLVERS[solver]}
    if solver != "sgd":
        opt.update(milestones=[args.milestone], gamma=0.1)
    if solver in ("ramda", "proxgen"):  # the two solvers with an inexact (accelerated PG) subproblem solve
        opt["options"] = {"inner_max_iter": args.inner_max_iter}
    lam = 0.0 if solver == "sgd" else args.lam
    return {
        "model": {"name": "mlp7", "options": {"width": args.width}},
        "data": {"name": "fashion_mnist", "options": {"limit_train": args.limit_train,
                                                      "val_fraction": args.val_fraction}},
        "optimizer": opt,
        "schedule": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": seed, "threads": args.threads,
                     "bn_recalibration_batches": 0},
        "structure": [{"select": "features.*", "types": ["Linear"], "kind": "lowrank", "lam": lam}],
        "deploy": {"batch_sizes": [1, 64], "threads": args.ort_threads, "warmup": 10, "runs": 50},
    }


def main(argv=None) -> int:
    from structkit.pipeline import Log, run
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--milestone", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lam", type=float, default=1e-3)
    p.add_argument("--inner-max-iter", type=int, default=100,
                   help="cap on RAMDA's / ProxGen's inner proximal-gradient iterations per step")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ort-threads", type=int, default=2)
    p.add_argument("--out", default="runs/lowrank")
    p.add_argument("--json", default="benchmarks/results/lowrank_mlp.json")
    p.add_argument("--quick", action="store_true", help="smoke version: 1000 images, 2 epochs")
    p.add_argument("--plot", default=None, help="also draw accuracy vs low-rank level here (e.g. docs/img/bench_lowrank.png)")
    p.add_argument("--plot-only", action="store_true", help="draw --plot from an existing --json and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.limit_train, args.epochs, args.milestone = 1000, 2, 1
        args.out, args.json = args.out + "_quick", args.json.replace(".json", "_quick.json")
    jpath = Path(args.json)
    if args.plot_only:
        plot(json.loads(jpath.read_text()), args.plot)
        return 0
    jpath.parent.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "paper": PAPER, "runs": {},
               "command": "python benchmarks/lowrank_mlp.py " + " ".join(argv or sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for seed in args.seeds:
        for solver in args.solvers:
            t0 = time.perf_counter()
            folder = Path(args.out) / f"{solver}_s{seed}"
            try:
                rep = run(config(args, solver, seed), folder, resume=True, log=Log(quiet=True))
            except Exception as exc:
                results["runs"].setdefault(solver, {})[str(seed)] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"[{solver} seed {seed}] FAILED: {exc}", flush=True)
                continue
            hist = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
            lat = rep.get("latency") or {}
            row = {"test_accuracy": rep["accuracy"]["slim"], "test_accuracy_trained": rep["accuracy"]["trained"],
                   "lowrank_level": (rep.get("sparsity") or {}).get("lowrank_level"),
                   "params_before": rep["params"]["before"], "params_after": rep["params"]["after"],
                   "macs_before": rep["macs"]["before"], "macs_after": rep["macs"]["after"],
                   "speedup_b1": (lat.get("1") or {}).get("speedup"), "speedup_b64": (lat.get("64") or {}).get("speedup"),
                   "epoch_seconds": [h["epoch_seconds"] for h in hist], "wall_s": time.perf_counter() - t0,
                   "val_accuracy": [h["val_accuracy"] for h in hist],
                   "lowrank_level_per_epoch": [h.get("lowrank_level") for h in hist],
                   "mean_inner_iters": (rep.get("solver") or {}).get("mean_inner_iters"),
                   "max_inner_iters": (rep.get("solver") or {}).get("max_inner_iters"),
                   "pg_solves": (rep.get("solver") or {}).get("pg_solves")}
            results["runs"].setdefault(solver, {})[str(seed)] = row
            print(f"[{solver} seed {seed}] test {row['test_accuracy']:.4f} lowrank {row['lowrank_level']} "
                  f"params {row['params_after']} speedup b64 {row['speedup_b64']}", flush=True)
            jpath.write_text(json.dumps(results, indent=1, default=float))
    if args.plot:
        plot(results, args.plot)
    return 0


def plot(results: dict, path: str) -> None:
    """Test accuracy against low-rank level, structkit (filled) next to the paper (open markers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, (solver, seeds) in enumerate(results["runs"].items()):
        color = f"C{k}"
        rows = [r for r in seeds.values() if "error" not in r]
        if rows:
            ax.scatter([100 * (r["lowrank_level"] or 0) for r in rows], [100 * r["test_accuracy"] for r in rows],
                       color=color, label=f"{solver} (structkit)")
        for lam, trial in sorted(results.get("lam_trials", {}).items()):  # extra lams (merged in by hand)
            extra = [r for r in trial.get("runs", {}).get(solver, {}).values() if "error" not in r]
            for r in extra:
                x, y = 100 * (r["lowrank_level"] or 0), 100 * r["test_accuracy"]
                ax.scatter([x], [y], color=color, marker="^")
                ax.annotate(f"lam {lam}", (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
        acc, level = results["paper"].get(solver, (None, None))
        if acc is not None:
            ax.scatter([level or 0], [acc], facecolors="none", edgecolors=color, marker="s",
                       label=f"{solver} (paper)")
    a = results["args"]
    ax.set_xlabel("low-rank level (% zero singular values)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"mlp7 (width {a['width']}), Fashion-MNIST ({a['limit_train']} train images, {a['epochs']} epochs), "
                 f"nuclear norm\ndots: lam {a['lam']}; triangles: other lams; open squares: the paper (full scale)",
                 fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
