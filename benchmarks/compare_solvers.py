"""Vision benchmark: channel group lasso on Fashion-MNIST with RAMDA, RMDA, ProxGen, ProxSGD, dense AdamW, and
Torch-Pruning magnitude pruning + fine-tuning at the MACs the selected RAMDA model reached.

Every structkit row is one ``structkit.pipeline.run`` (train -> recalibrate -> prune, verified -> ONNX export ->
ONNX Runtime latency), so accuracy, weighted group sparsity (WGS), params/MACs after pruning, ORT speedups and
per-epoch wall times all come from ``report.json`` / ``metrics.jsonl`` of each run folder.

Protocol (``docs/benchmarks.md`` section 1):
- the same model, data, groups (input channels of every conv after the first, and the classifier's columns, so a
  zero group removes the producing channel), schedule (``--epochs``, one restart stage at the last epoch) and lam
  grid for the four solvers; each solver at its documented default lr/momentum (docs/solvers.md);
- lam is chosen per solver on the validation split (never the test split): the largest mean validation WGS among
  the lams whose mean validation accuracy is within ``--val-tol`` of dense AdamW's; if none qualifies, the lam
  with the best validation accuracy. All lams stay in the JSON and the tables; the chosen one is marked;
- the sweep runs on the first seed only; the other seeds run each solver at its chosen lam (the sweep on every
  seed did not fit a shared 2-core machine);
- ``--tp-only`` adds Torch-Pruning at the MACs of every RAMDA row; ``--timing`` measures training-step times of
  all optimizers interleaved in one process (per-run epoch times drift with other jobs' load);
  ``--table`` prints the markdown table of the JSON.

    python benchmarks/compare_solvers.py --out runs/compare --json benchmarks/results/compare_solvers.json
    python benchmarks/compare_solvers.py --quick            # minutes-long smoke version

Results are appended run by run (``--json``), and a run folder that already holds a report is reused, so an
interrupted invocation can be repeated to continue.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.defaults import ADAMW, SOLVERS  # noqa: E402  (after the sys.path line)
from benchmarks.timing import median_ratios, round_robin_step_times  # noqa: E402


def base_config(args, seed: int) -> dict:
    return {
        "model": {"name": args.model, "options": {"widths": args.widths}},
        "data": {"name": "fashion_mnist", "options": {"limit_train": args.limit_train or None,
                                                      "val_fraction": args.val_fraction}},
        "optimizer": {"name": "adamw"},
        "schedule": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": seed, "threads": args.threads},
        "structure": [{"select": args.select, "types": ["Conv2d"], "kind": "channels", "lam": 0.0}],
        "prune": {"round_to": args.round_to},
        "deploy": {"batch_sizes": [1, 64], "threads": args.ort_threads, "warmup": args.warmup, "runs": args.runs},
    }


def solver_config(args, solver: str, lam: float, seed: int) -> dict:
    cfg = base_config(args, seed)
    cfg["optimizer"] = {"name": solver, **SOLVERS[solver], "milestones": [args.milestone], "gamma": 0.1}
    cfg["structure"] = [{"select": args.select, "types": ["Conv2d"], "kind": "channels", "lam": lam}]
    return cfg


def adamw_config(args, seed: int) -> dict:
    cfg = base_config(args, seed)
    cfg["optimizer"] = {"name": "adamw", **ADAMW}
    return cfg


def summarize(report: dict, folder: Path) -> dict:
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    lat = report.get("latency") or {}
    sp = report.get("sparsity") or {}
    return {
        "test_accuracy": report["accuracy"]["slim"], "test_accuracy_trained": report["accuracy"]["trained"],
        "val_accuracy": report["accuracy"]["val_final"],
        "wgs": sp.get("weighted_group_sparsity"), "zero_groups": sp.get("zero_groups"),
        "num_groups": sp.get("num_groups"),
        "params_before": report["params"]["before"], "params_after": report["params"]["after"],
        "macs_before": report["macs"]["before"], "macs_after": report["macs"]["after"],
        "speedup_b1": (lat.get("1") or {}).get("speedup"), "speedup_b64": (lat.get("64") or {}).get("speedup"),
        "latency": lat,
        "epoch_seconds": [r["epoch_seconds"] for r in history],
        "curve": [{k: r.get(k) for k in ("epoch", "train_loss", "val_accuracy", "weighted_group_sparsity")}
                  for r in history],
        "widths": {name: e.get("after") if isinstance(e, dict) else e
                   for name, e in (report.get("layers") or {}).items()} if isinstance(report.get("layers"), dict)
        else report.get("layers"),
        "verify_max_abs_diff": (report.get("verify") or {}).get("max_abs_diff_torch"),
    }


def run_one(cfg: dict, folder: Path) -> dict:
    from structkit.pipeline import Log, run
    if (folder / "report.json").is_file():
        report = json.loads((folder / "report.json").read_text())
        if report.get("latency"):
            return summarize(report, folder)
    t0 = time.perf_counter()
    report = run(cfg, folder, resume=True, log=Log(quiet=True))
    out = summarize(report, folder)
    out["wall_s"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------------ Torch-Pruning

def torch_pruning_row(args, adamw_folder: Path, target_macs: float, seed: int, out: Path,
                      round_to: int | None = "args", tag: str = "") -> dict:
    """Magnitude (L2) channel pruning of the trained AdamW model with torch-pruning's MetaPruner (global uniform
    ratio found by bisection so that MACs <= target, channels rounded to ``round_to``), then ``--ft-epochs`` of
    AdamW fine-tuning at lr/10, BatchNorm recalibration, and the same ONNX export/latency protocol."""
    import torch_pruning as tp
    from structkit.config import validate
    from structkit.data import make_loaders
    from structkit.deploy import export_onnx, measure_latency
    from structkit.pipeline import RunFolder, build, recalibration_batches, seed_everything
    from structkit.training import evaluate, recalibrate_batchnorm, train_epoch

    if round_to == "args":
        round_to = args.round_to
    cfg = validate(adamw_config(args, seed))
    setup = build(cfg)
    setup.model.load_state_dict(RunFolder(adamw_folder).last_checkpoint()["model"])
    dense = setup.model.eval()
    example = setup.example_inputs[:1]
    macs0, params0 = tp.utils.count_ops_and_params(dense, example)

    def pruned(ratio: float):
        m = copy.deepcopy(dense)
        pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=[m.classifier],
                                      round_to=round_to, global_pruning=False)
        pruner.step()
        macs, params = tp.utils.count_ops_and_params(m, example)
        return m, macs, params

    lo, hi = 0.0, 0.95
    best = (dense, macs0, params0, 0.0)
    for _ in range(12):
        mid = (lo + hi) / 2
        m, macs, params = pruned(mid)
        if macs <= target_macs:
            best, hi = (m, macs, params, mid), mid
        else:
            lo = mid
    slim, macs, params, ratio = best
    s = cfg.schedule
    train_loader, _, test_loader = make_loaders(setup.splits, s.batch_size, seed=s.seed,
                                                eval_batch_size=s.eval_batch_size)
    recal = recalibration_batches(setup)
    recalibrate_batchnorm(slim, recal)
    acc_pruned = evaluate(slim, test_loader)["accuracy"]
    seed_everything(seed)
    train_loader.generator.manual_seed(seed)
    opt = torch.optim.AdamW(slim.parameters(), lr=ADAMW["lr"] / 10)
    ft_seconds = []
    for epoch in range(1, args.ft_epochs + 1):
        t0 = time.perf_counter()
        train_epoch(slim, train_loader, opt, epoch=epoch)
        ft_seconds.append(time.perf_counter() - t0)
    recalibrate_batchnorm(slim, recal)
    acc = evaluate(slim, test_loader)["accuracy"]
    folder = out / f"torch_pruning{tag}_s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    inputs = setup.verify_inputs[:64]
    export_onnx(dense, inputs, folder / "dense.onnx")
    export_onnx(slim, inputs, folder / "slim.onnx")
    images = setup.splits.test.tensors[0][:64].numpy()
    lat = measure_latency({"dense": folder / "dense.onnx", "slim": folder / "slim.onnx"},
                          lambda b: {"input": np.ascontiguousarray(images[:b])}, [1, 64], threads=args.ort_threads,
                          warmup=args.warmup, runs=args.runs)
    widths = [m.out_channels for m in slim.modules() if isinstance(m, torch.nn.Conv2d)]
    return {"test_accuracy": acc, "test_accuracy_before_finetune": acc_pruned, "pruning_ratio": ratio,
            "params_before": params0, "params_after": params, "macs_before": macs0, "macs_after": macs,
            "target_macs": target_macs, "speedup_b1": lat["1"]["speedup"], "speedup_b64": lat["64"]["speedup"],
            "latency": {k: v for k, v in lat.items() if k != "protocol"}, "widths": widths,
            "finetune_epoch_seconds": ft_seconds, "wgs": None, "round_to": round_to}


# ------------------------------------------------------------------------------------------------ aggregation

def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: dict, args, restrict: dict | None = None) -> dict:
    """Per (solver, lam): means/stds over seeds; lam selection on validation; epoch-time ratio to AdamW."""
    rows = {}
    for key, per_seed in results["runs"].items():
        seeds = sorted(per_seed)
        r = [per_seed[s] for s in seeds]
        row = {"key": key, "seeds": seeds}
        for f in ("test_accuracy", "val_accuracy", "wgs", "params_after", "macs_after", "speedup_b1",
                  "speedup_b64"):
            row[f], row[f + "_std"] = mean_std([x.get(f) for x in r])
        row["params_before"] = r[0].get("params_before")
        row["macs_before"] = r[0].get("macs_before")
        # epoch time: mean over seeds of each run's median epoch (epoch 1 includes no extra set-up)
        row["epoch_s"] = statistics.fmean(statistics.median(x["epoch_seconds"]) for x in r)
        rows[key] = row
    adam = rows.get("adamw")
    for row in rows.values():
        row["epoch_ratio"] = row["epoch_s"] / adam["epoch_s"] if adam else None
    chosen = {}
    for solver in SOLVERS:
        cands = [rows[k] for k in rows if k.startswith(solver + "_lam")]
        if not cands:
            continue
        ok = [c for c in cands if adam and c["val_accuracy"] >= adam["val_accuracy"] - args.val_tol]
        pick = max(ok, key=lambda c: c["wgs"] or 0.0) if ok else max(cands, key=lambda c: c["val_accuracy"])
        chosen[solver] = restrict[solver] if restrict and solver in restrict else pick["key"]
    return {"rows": rows, "chosen": chosen}


def interleaved_timing(args, rounds: int = 5, steps: int = 40) -> dict:
    """Training-step wall time of every solver relative to AdamW under the same conditions: all models in one
    process, the same batches, ``rounds`` rounds of ``steps`` steps per solver, the solver order reversed every
    other round (the per-run epoch times of a shared machine drift with other jobs' load)."""
    from structkit.config import validate
    from structkit.data import make_loaders
    from structkit.pipeline import build, make_solver

    torch.set_num_threads(args.threads)
    names = ["adamw"] + list(SOLVERS)
    lam = args.lams[0]
    setups = {}
    for name in names:
        cfg = validate(adamw_config(args, 0) if name == "adamw" else solver_config(args, name, lam, 0))
        setup = build(cfg)
        solver, _ = make_solver(cfg, setup.groupset)
        setups[name] = (setup.model, solver)
    loader, _, _ = make_loaders(setup.splits, args.batch_size, seed=0)
    batches = []
    for x, y in loader:
        batches.append((x, y))
        if len(batches) == steps:
            break
    times = round_robin_step_times(setups, batches, torch.nn.functional.cross_entropy, rounds)
    return {**median_ratios(times), "rounds": rounds, "steps": steps, "threads": args.threads,
            "batch_size": args.batch_size, "lam": lam}


def markdown_table(results: dict) -> str:
    """The section-1 table of docs/benchmarks.md from the JSON (chosen lam rows first, then the other lams)."""
    rows, chosen = results["rows"], results.get("chosen", {})

    def pm(row, f, scale=100, digits=2):
        m, s = row.get(f), row.get(f + "_std")
        if m is None:
            return "-"
        return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if s is not None and len(row["seeds"]) > 1 \
            else f"{m * scale:.{digits}f}"

    head = ("| row | lam | seeds | test acc % | val acc % | WGS % | params after | MACs after (M) | ORT speedup b1 | "
            "ORT speedup b64 | epoch time / AdamW |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    order = (["adamw"] + [chosen[s] for s in SOLVERS if s in chosen]
             + sorted(k for k in rows if k != "adamw" and k not in chosen.values()))
    for key in order:
        r = rows[key]
        name, lam = (key.split("_lam") + ["-"])[:2]
        mark = " (chosen)" if key in chosen.values() else " (sweep only)" if key != "adamw" else " (dense)"
        lines.append(f"| {name}{mark} | {lam} | {len(r['seeds'])} | {pm(r, 'test_accuracy')} | "
                     f"{pm(r, 'val_accuracy')} | {pm(r, 'wgs', 100, 1)} | {r['params_after']:,.0f} / "
                     f"{r['params_before']:,} | {r['macs_after'] / 1e6:.2f} / {r['macs_before'] / 1e6:.2f} | "
                     f"{pm(r, 'speedup_b1', 1)} | {pm(r, 'speedup_b64', 1)} | {r['epoch_ratio']:.2f} |")
    tp = results.get("torch_pruning") or {}
    if tp:
        vals = list(tp.values())
        acc = [v["test_accuracy"] for v in vals]
        m, s = mean_std(acc)
        b1, b64 = mean_std([v["speedup_b1"] for v in vals]), mean_std([v["speedup_b64"] for v in vals])
        lines.append(f"| Torch-Pruning L2 magnitude + 1 ep fine-tune | - | {len(vals)} | {m*100:.2f} ± {s*100:.2f} | - | "
                     f"- | {statistics.fmean(v['params_after'] for v in vals):,.0f} / {vals[0]['params_before']:,} | "
                     f"{statistics.fmean(v['macs_after'] for v in vals)/1e6:.2f} / {vals[0]['macs_before']/1e6:.2f} | "
                     f"{b1[0]:.2f} ± {b1[1]:.2f} | {b64[0]:.2f} ± {b64[1]:.2f} | - |")
    for key, per_seed in (results.get("torch_pruning_matched") or {}).items():
        vals = list(per_seed.values())
        m, sd = mean_std([v["test_accuracy"] for v in vals])
        b1, b64 = mean_std([v["speedup_b1"] for v in vals]), mean_std([v["speedup_b64"] for v in vals])
        lines.append(f"| Torch-Pruning @ {key} MACs (widths {'-'.join(map(str, vals[0]['widths']))}) | - | {len(vals)} | "
                     f"{m*100:.2f} ± {sd*100:.2f} | - | - | {vals[0]['params_after']:,} / {vals[0]['params_before']:,} | "
                     f"{vals[0]['macs_after']/1e6:.2f} / {vals[0]['macs_before']/1e6:.2f} | {b1[0]:.2f} ± {b1[1]:.2f} | "
                     f"{b64[0]:.2f} ± {b64[1]:.2f} | - |")
    return "\n".join(lines)


def execute(plan, args, out: Path, results: dict, save) -> None:
    for key, seed, cfg in plan:
        t0 = time.perf_counter()
        try:
            res = run_one(cfg, out / f"{key}_s{seed}")
        except Exception as exc:  # keep going: a failed run is recorded, not hidden
            res = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"[{key} seed {seed}] FAILED: {res['error']}", flush=True)
        else:
            print(f"[{key} seed {seed}] test {res['test_accuracy']:.4f} val {res['val_accuracy']:.4f} "
                  f"wgs {res['wgs'] or 0:.3f} macs {res['macs_after']/1e6:.2f}M speedup b1 {res['speedup_b1']:.2f} "
                  f"b64 {res['speedup_b64']:.2f} epoch {statistics.median(res['epoch_seconds']):.1f}s "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            results["runs"].setdefault(key, {})[str(seed)] = res
        save()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--widths", type=int, nargs="+", default=[16, 16, 32, 32, 64])
    p.add_argument("--select", default="features.*", help="structure rule's module pattern (every Conv2d it "
                   "matches gets channel groups); '*' for resnet_small")
    p.add_argument("--limit-train", type=int, default=10000, help="training images (0: all 54,000 left after "
                   "the validation split at --val-fraction 0.1)")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--milestone", type=int, default=3, help="the final stage (restart + momentum ramp) starts after "
                                                               "this epoch; it needs >= 100 steps to reach c = 1")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lams", type=float, nargs="+", default=[5e-4, 2e-3])
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    p.add_argument("--threads", type=int, default=1, help="torch threads for training")
    p.add_argument("--ort-threads", type=int, default=2)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--val-tol", type=float, default=0.01, help="lam selection: val accuracy within this of AdamW's")
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--no-torch-pruning", action="store_true")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--json", default="benchmarks/results/compare_solvers.json")
    p.add_argument("--quick", action="store_true", help="smoke version: 1000 images, 2 epochs, 1 seed, 1 lam")
    p.add_argument("--timing", action="store_true", help="interleaved training-step timing of every solver vs "
                                                             "AdamW only (adds step_timing to --json)")
    p.add_argument("--tp-only", action="store_true", help="Torch-Pruning (round_to None) at the MACs of every RAMDA "
                                                           "row of --json (adds torch_pruning_matched)")
    p.add_argument("--table", action="store_true", help="print the markdown table of --json and exit")
    p.add_argument("--merge", type=Path, nargs="+", default=[], help="merge the runs and Torch-Pruning rows of "
                   "these result JSONs (e.g. another seed run in a second process) into --json, re-aggregate, exit")
    args = p.parse_args(argv)
    if args.timing:
        jpath = Path(args.json)
        results = json.loads(jpath.read_text()) if jpath.is_file() else {}
        results["step_timing"] = interleaved_timing(args)
        results["step_timing"]["command"] = "python benchmarks/compare_solvers.py " + " ".join(argv or sys.argv[1:])
        results["step_timing"]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        jpath.write_text(json.dumps(results, indent=1, default=float))
        print(json.dumps(results["step_timing"], indent=1))
        return 0
    if args.tp_only:  # Torch-Pruning at the MACs of every RAMDA row (widths unaligned: round_to None)
        jpath = Path(args.json)
        results = json.loads(jpath.read_text())
        extra = results.setdefault("torch_pruning_matched", {})
        for key, row in results["rows"].items():
            if not key.startswith("ramda"):
                continue
            for seed in args.seeds:
                r = torch_pruning_row(args, Path(args.out) / f"adamw_s{seed}", row["macs_after"], seed,
                                      Path(args.out), round_to=None, tag=f"_{key}")
                print(f"[torch_pruning @ {key} seed {seed}] test {r['test_accuracy']:.4f} macs "
                      f"{r['macs_after']/1e6:.2f}M widths {r['widths']} b1 {r['speedup_b1']:.2f} "
                      f"b64 {r['speedup_b64']:.2f}", flush=True)
                extra.setdefault(key, {})[str(seed)] = r
                jpath.write_text(json.dumps(results, indent=1, default=float))
        return 0
    if args.merge:
        jpath = Path(args.json)
        results = json.loads(jpath.read_text())
        for other in map(json.loads, (m.read_text() for m in args.merge)):
            for key, per_seed in other.get("runs", {}).items():
                results["runs"].setdefault(key, {}).update(per_seed)
            results.setdefault("torch_pruning", {}).update(other.get("torch_pruning") or {})
        results.update(aggregate(results, args, restrict=results.get("sweep_chosen")))
        jpath.write_text(json.dumps(results, indent=1, default=float))
        print(markdown_table(results))
        return 0
    if args.table:
        print(markdown_table(json.loads(Path(args.json).read_text())))
        return 0
    if args.quick:
        args.limit_train, args.epochs, args.milestone, args.seeds, args.lams = 1000, 2, 1, [0], [2e-3]
        args.warmup, args.runs, args.out = 5, 20, args.out + "_quick"
        args.json = args.json.replace(".json", "_quick.json")
    from structkit.runtime import reuse_freed_memory
    reuse_freed_memory()
    out, jpath = Path(args.out), Path(args.json)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(jpath.read_text()) if jpath.is_file() else {}
    results.update({"args": vars(args), "command": "python benchmarks/compare_solvers.py " + " ".join(argv or sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": results.get("runs", {})})

    def save(restrict=None):
        results.update(aggregate(results, args, restrict) if results["runs"] else {})
        jpath.write_text(json.dumps(results, indent=1, default=float))

    # phase 1: the lam sweep on the first seed; phase 2: the other seeds at each solver's chosen lam (the sweep on
    # every seed does not fit this machine's budget; see docs/benchmarks.md)
    first = args.seeds[0]
    plan = [("adamw", first, adamw_config(args, first))]
    plan += [(f"{solver}_lam{lam:g}", first, solver_config(args, solver, lam, first))
             for lam in args.lams for solver in args.solvers]
    execute(plan, args, out, results, save)
    results["sweep_chosen"] = dict(results.get("chosen", {}))
    for seed in args.seeds[1:]:
        plan = [("adamw", seed, adamw_config(args, seed))]
        for solver, key in results["sweep_chosen"].items():
            lam = float(key.split("_lam")[1])
            plan.append((key, seed, solver_config(args, solver, lam, seed)))
        execute(plan, args, out, results, save)
    results.update(aggregate(results, args, restrict=results["sweep_chosen"]))
    save(restrict=results["sweep_chosen"])

    if not args.no_torch_pruning and "ramda" in results.get("chosen", {}):
        ramda = results["rows"][results["chosen"]["ramda"]]
        target = ramda["macs_after"]
        tp_rows = {}
        for seed in args.seeds:
            try:
                r = torch_pruning_row(args, out / f"adamw_s{seed}", target, seed, out)
            except Exception as exc:
                print(f"[torch_pruning seed {seed}] FAILED: {type(exc).__name__}: {exc}", flush=True)
                continue
            print(f"[torch_pruning seed {seed}] test {r['test_accuracy']:.4f} macs {r['macs_after']/1e6:.2f}M "
                  f"speedup b1 {r['speedup_b1']:.2f} b64 {r['speedup_b64']:.2f}", flush=True)
            tp_rows[str(seed)] = r
        results["torch_pruning"] = tp_rows
        save(restrict=results["sweep_chosen"])
    print(json.dumps({"chosen": results.get("chosen")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
