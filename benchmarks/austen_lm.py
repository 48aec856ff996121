"""Language-model benchmark (docs/benchmarks.md section 3): a small character-level transformer LM on Jane Austen's
novels with attention-head groups and FFN-channel groups, trained by RAMDA, RMDA, ProxGen, ProxSGD and dense AdamW.

Why character level: the vocabulary is the 81 characters of the text (no tokenizer to ship or train, nothing
downloaded), so the embeddings and output layer are tiny and almost all parameters sit in the attention and FFN
weights that the groups cover; perplexity is per character.

Data (``structkit.text.austen_chars``): the six novels joined into one text (about 3.6M characters), cut into
non-overlapping windows of ``--seq-len`` characters; the last 5 % of the text (by position) is the validation split
and the 5 % after it the test split, so held-out text is never trained on. Training windows are shuffled; an
"epoch" here is ``--steps-per-epoch`` batches of ``--batch-size`` windows drawn without replacement from a seeded
permutation of the training windows (renewed when exhausted), the same batch sequence for every optimizer.

Protocol:
- model ``TinyTransformerLM`` (``--d-model``, ``--n-heads``, ``--n-layers``, ``--d-ff``, pre-LN, learned positions);
- groups, the same for every structured solver: one group per attention head in every layer (its q, k, v rows and
  its output-projection columns; kind ``heads``) and one group per FFN hidden unit (row + bias of ``ffn.fc1``;
  kind ``channels``: a zero unit gives GELU(0) = 0, so the matching columns of ``ffn.fc2`` go with it). Embeddings,
  LayerNorms, the residual width and the output layer are never grouped;
- each solver at its documented default lr/momentum (docs/solvers.md); AdamW lr 2e-3;
  ``--epochs`` epochs with one milestone (``--milestone``): there the structured solvers restart (lr x 0.1) and
  RAMDA/RMDA ramp the averaging momentum to 1 in the final stage (``StageScheduler``), so their iterate carries the
  exact zeros; AdamW's lr is also multiplied by 0.1 there (the same lr decay for the dense reference);
- lam is chosen per solver on the validation split: the largest WGS among the lams whose validation perplexity is
  at most ``(1 + --val-tol)`` x AdamW's; if none qualifies, the lam with the lowest validation perplexity. Test
  perplexity is reported too (never used for a choice);
- after training: zero groups -> ``structkit.prune`` (exact; verified on held-out windows, max |diff| of the
  logits reported) -> ONNX export of dense and slim (``structkit.deploy.export_onnx``) -> ONNX Runtime latency with
  ``structkit.deploy.measure_latency`` (interleaved dense/slim, each at its fastest graph level) at batch 1 and
  ``--ort-batch``, sequence length = ``--seq-len`` (a row where nothing was removed has no latency: slim = dense);
- after the sweep, an interleaved training-step timing of all five optimizers in one process (the same batches,
  rounds in alternating order; median per-step time, ratio to AdamW), because per-run epoch wall times on a shared
  machine drift with other jobs' load; ``--noise-floor N`` times the dense ONNX model against itself N times (the
  band a speedup must leave to mean anything).

    python benchmarks/austen_lm.py                      # full run (65 min on one core of a loaded 2-core machine), JSON + plot
    python benchmarks/austen_lm.py --quick              # smoke version (under a minute; runs/austen_lm_quick/)
    python benchmarks/austen_lm.py --noise-floor 3      # ORT dense-vs-itself "speedups", added to the JSON
    python benchmarks/austen_lm.py --skip-adamw --solvers ramda --lams 0 5e-6 --no-timing \\
        --json runs/austen_lm_extra/extra.json --onnx-dir runs/austen_lm_extra/onnx   # extra lam points
    python benchmarks/austen_lm.py --merge-extra runs/austen_lm_extra/extra.json     # ... added as extra_runs
    python benchmarks/austen_lm.py --table              # markdown table of the JSON

Results are written after every run (``--json``); runs already in the JSON with the same settings are reused, so an
interrupted invocation can be repeated to continue.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.defaults import ADAMW, SOLVERS  # noqa: E402  (after the sys.path line)
from benchmarks.timing import median_ratios, round_robin_step_times  # noqa: E402

NAMES = ["adamw"] + list(SOLVERS)
DEFAULT_JSON, DEFAULT_PLOT = "benchmarks/results/austen_lm.json", "docs/img/bench_lm.png"


# ------------------------------------------------------------------------------------------------ set-up

def load_data(args):
    from structkit.text import austen_chars
    return austen_chars(seq_len=args.seq_len, limit_chars=args.limit_chars, val_fraction=0.05, test_fraction=0.05,
                        seed=args.seed)


def rules(lam: float) -> list[dict]:
    return [{"kind": "heads", "select": "blocks.*.attn", "lam": lam},
            {"kind": "channels", "select": "blocks.*.ffn.fc1", "types": ["Linear"], "lam": lam}]


def build(args, splits, name: str, lam: float):
    """Model, GroupSet, optimizer and StageScheduler for one row (seeded: every row starts from the same weights)."""
    import structkit
    from structkit.models import tiny_transformer_lm
    from structkit.solvers import StageScheduler, get_solver

    torch.manual_seed(args.seed)
    model = tiny_transformer_lm(input_shape=(args.seq_len,), num_classes=splits.num_classes, d_model=args.d_model,
                                n_heads=args.n_heads, n_layers=args.n_layers, d_ff=args.d_ff, max_len=args.seq_len)
    example = splits.val.tensors[0][:2]
    gs = structkit.group_parameters(model, example, rules(lam))
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    else:
        opt = get_solver(name)(gs.param_groups(), **SOLVERS[name])
    sched = StageScheduler(opt, milestones=[args.milestone], gamma=0.1)
    return model, gs, opt, sched


def batch_stream(splits, batch_size: int, seed: int):
    """Endless batches of training windows, drawn without replacement from seeded permutations."""
    x, y = splits.train.tensors
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield x[idx], y[idx]


@torch.no_grad()
def mean_ce(model, dataset, batch_size: int = 64, limit: int | None = None) -> float:
    """Mean per-character cross-entropy (nats) over ``dataset`` (perplexity = exp of it), eval mode."""
    was = model.training
    model.eval()
    x, y = dataset.tensors
    if limit:
        x, y = x[:limit], y[:limit]
    total, n = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        total += float(F.cross_entropy(logits.flatten(0, 1), y[i:i + batch_size].flatten(), reduction="sum"))
        n += y[i:i + batch_size].numel()
    model.train(was)
    return total / n


def unigram_ppl(splits) -> float:
    """Perplexity on the validation text of the training text's character frequencies (add-one smoothed)."""
    counts = torch.bincount(splits.train.tensors[1].flatten(), minlength=splits.num_classes).double() + 1
    logp = (counts / counts.sum()).log()
    return float(torch.exp(-logp[splits.val.tensors[1].flatten()].mean()))


# ------------------------------------------------------------------------------------------------ one row

def train_row(args, splits, name: str, lam: float, onnx_dir: Path) -> dict:
    import structkit
    from structkit.deploy import export_onnx, measure_latency

    torch.set_num_threads(args.threads)
    model, gs, opt, sched = build(args, splits, name, lam)
    stream = batch_stream(splits, args.batch_size, args.seed)
    curve, epoch_seconds = [], []
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0, total = time.perf_counter(), 0.0
        for _ in range(args.steps_per_epoch):
            xb, yb = next(stream)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb).flatten(0, 1), yb.flatten())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{name} lam {lam:g}: training loss {loss.item()} at epoch {epoch}")
            loss.backward()
            opt.step()
            total += loss.item()
        epoch_seconds.append(time.perf_counter() - t0)
        sched.step()
        val = mean_ce(model, splits.val, limit=args.epoch_val_windows)
        m = gs.metrics()
        curve.append({"epoch": epoch, "train_loss": total / args.steps_per_epoch, "val_ppl_subset": math.exp(val),
                      "wgs": m["weighted_group_sparsity"], "zero_groups": m["zero_groups"]})
        print(f"  [{name} lam {lam:g}] epoch {epoch}: train loss {curve[-1]['train_loss']:.3f} val ppl "
              f"{math.exp(val):.3f} wgs {m['weighted_group_sparsity'] or 0:.3f} zero groups {m['zero_groups']} "
              f"({epoch_seconds[-1]:.0f}s)", flush=True)
    model.eval()
    m = gs.metrics()
    row = {"solver": name, "lam": lam, "hyper": ADAMW if name == "adamw" else SOLVERS[name],
           "val_ppl": math.exp(mean_ce(model, splits.val)), "test_ppl": math.exp(mean_ce(model, splits.test)),
           "wgs": m["weighted_group_sparsity"], "zero_groups": m["zero_groups"], "num_groups": m["num_groups"],
           "epoch_seconds": epoch_seconds, "curve": curve}
    verify_x = splits.val.tensors[0][:args.verify_windows]
    slim, report = structkit.prune(model, gs, verify_x)
    layers = report.layers
    row.update({
        "params_before": report.params_before, "params_after": report.params_after,
        "macs_before": report.macs_before, "macs_after": report.macs_after,
        "verify_max_abs_diff": report.verify_max_abs_diff, "verify_windows": len(verify_x),
        "heads_kept": [layers[f"blocks.{i}.attn"]["after"] for i in range(args.n_layers)],
        "ffn_kept": [layers[f"blocks.{i}.ffn.fc1"]["after"] for i in range(args.n_layers)],
        "skipped": report.skipped,
    })
    # the slim model scored on the same validation windows as the last epoch's score (a check of exactness)
    row["slim_val_ppl_subset"] = math.exp(mean_ce(slim, splits.val, limit=args.epoch_val_windows))
    if row["params_after"] == row["params_before"]:
        row.update({"speedup_b1": None, f"speedup_b{args.ort_batch}": None, "latency": None})
        return row  # nothing removed: the slim model is the dense one, no latency to compare
    onnx_dir.mkdir(parents=True, exist_ok=True)
    ex = splits.val.tensors[0][:2]
    row["onnx_dense"] = export_onnx(model, ex, onnx_dir / f"{name}_lam{lam:g}_dense.onnx")
    row["onnx_slim"] = export_onnx(slim, ex, onnx_dir / f"{name}_lam{lam:g}_slim.onnx")
    tokens = splits.val.tensors[0][:args.ort_batch].numpy()
    lat = measure_latency({"dense": row["onnx_dense"]["path"], "slim": row["onnx_slim"]["path"]},
                          lambda b: {"input": np.ascontiguousarray(tokens[:b])}, [1, args.ort_batch],
                          threads=args.ort_threads, warmup=args.warmup, runs=args.runs)
    row["latency"] = lat
    row["speedup_b1"] = lat["1"]["speedup"]
    row[f"speedup_b{args.ort_batch}"] = lat[str(args.ort_batch)]["speedup"]
    return row


# ------------------------------------------------------------------------------------------------ timing

def interleaved_timing(args, splits, rounds: int, steps: int) -> dict:
    """Training-step wall time of every optimizer relative to AdamW: all five models in one process, the same
    ``steps`` batches, ``rounds`` recorded rounds (plus one warm-up round) with the order reversed every other round;
    the structured solvers use the first lam of the sweep."""
    torch.set_num_threads(args.threads)
    setups = {n: build(args, splits, n, args.lams[0]) for n in NAMES}
    stream = batch_stream(splits, args.batch_size, args.seed + 1)
    batches = [next(stream) for _ in range(steps)]
    times = round_robin_step_times({n: (setups[n][0], setups[n][2]) for n in NAMES}, batches,
                                   lambda out, yb: F.cross_entropy(out.flatten(0, 1), yb.flatten()), rounds)
    return {**median_ratios(times), "step_ms_all_rounds": {n: [v * 1e3 for v in t] for n, t in times.items()},
            "rounds": rounds, "steps": steps, "threads": args.threads, "batch_size": args.batch_size,
            "lam": args.lams[0]}


def noise_floor(args, splits, repeats: int) -> dict:
    """ORT "speedup" of the dense model against itself (the same ONNX file opened twice, same protocol, ``repeats``
    times): the band a measured speedup must leave to mean anything. Latency does not depend on the weights' values,
    so the untrained model of the same architecture is used."""
    from structkit.deploy import export_onnx, measure_latency
    torch.set_num_threads(args.threads)
    model = build(args, splits, "adamw", 0.0)[0].eval()
    path = export_onnx(model, splits.val.tensors[0][:2], Path(args.onnx_dir) / "noise_floor_dense.onnx")["path"]
    tokens = splits.val.tensors[0][:args.ort_batch].numpy()
    out = {"1": [], str(args.ort_batch): []}
    for _ in range(repeats):
        lat = measure_latency({"dense": path, "slim": path}, lambda b: {"input": np.ascontiguousarray(tokens[:b])},
                              [1, args.ort_batch], threads=args.ort_threads, warmup=args.warmup, runs=args.runs)
        for b in out:
            out[b].append(lat[b]["speedup"])
    return {"speedup_dense_vs_itself": out, "repeats": repeats, "threads": args.ort_threads,
            "warmup": args.warmup, "runs": args.runs}


# ------------------------------------------------------------------------------------------------ selection / output

def choose(results: dict, val_tol: float) -> dict:
    runs = results["runs"]
    adam = runs.get("adamw")
    chosen = {}
    for solver in SOLVERS:
        cands = [k for k in runs if k.startswith(solver + "_lam") and "error" not in runs[k]]
        if not cands:
            continue
        ok = [k for k in cands if adam and runs[k]["val_ppl"] <= adam["val_ppl"] * (1 + val_tol)]
        chosen[solver] = (max(ok, key=lambda k: (runs[k]["wgs"] or 0.0, -runs[k]["val_ppl"])) if ok
                          else min(cands, key=lambda k: runs[k]["val_ppl"]))
    return chosen


def markdown_table(results: dict) -> str:
    runs, chosen = results["runs"], results.get("chosen", {})
    nb = results["args"]["ort_batch"]
    timing = (results.get("step_timing") or {}).get("ratio_to_adamw", {})
    adam_epoch = statistics.median(runs["adamw"]["epoch_seconds"]) if "adamw" in runs else None
    lines = [f"| row | lam | val ppl | test ppl | WGS % | zero groups | heads kept / layer | FFN units kept / layer | "
             f"params after / before | ORT speedup b1 | ORT speedup b{nb} | epoch s (/ AdamW) | step time / AdamW "
             f"(interleaved) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = ["adamw"] * ("adamw" in runs) + [chosen[s] for s in SOLVERS if s in chosen] + sorted(
        k for k in runs if k != "adamw" and k not in chosen.values())
    for key in order:
        r = runs[key]
        name = key.split("_lam")[0]
        if "error" in r:
            lines.append(f"| {name} | {r.get('lam', '-')} | failed: {r['error']} |" + " |" * 11)
            continue
        mark = " (dense)" if key == "adamw" else " (chosen)" if key in chosen.values() else " (sweep only)"
        ep = statistics.median(r["epoch_seconds"])

        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        lines.append(
            f"| {name}{mark} | {'-' if key == 'adamw' else format(r['lam'], 'g')} | {r['val_ppl']:.3f} | "
            f"{r['test_ppl']:.3f} | {100 * (r['wgs'] or 0):.1f} | {r['zero_groups']} / {r['num_groups']} | "
            f"{'-'.join(map(str, r['heads_kept']))} | {'-'.join(map(str, r['ffn_kept']))} | "
            f"{r['params_after']:,} / {r['params_before']:,} | {f(r.get('speedup_b1'), '.2f')} | "
            f"{f(r.get(f'speedup_b{nb}'), '.2f')} | {ep:.0f} ({f(adam_epoch and ep / adam_epoch, '.2f')}) | "
            f"{f(timing.get(name), '.2f')} |")
    return "\n".join(lines)


def extra_table(results: dict) -> str:
    """Extra lam points (``--merge-extra``): same columns as the main table, without the timing columns."""
    nb = results["args"]["ort_batch"]
    lines = [f"| row | lam | val ppl | test ppl | WGS % | zero groups | heads kept / layer | FFN units kept / layer | "
             f"params after / before | ORT speedup b1 | ORT speedup b{nb} |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted((results.get("extra_runs") or {}).items(), key=lambda kv: (kv[0].split("_lam")[0],
                                                                                     kv[1].get("lam", 0))):
        if "error" in r:
            lines.append(f"| {key} | failed: {r['error']} |")
            continue
        sp = [("-" if r.get(c) is None else f"{r[c]:.2f}") for c in ("speedup_b1", f"speedup_b{nb}")]
        lines.append(f"| {key.split('_lam')[0]} (extra) | {r['lam']:g} | {r['val_ppl']:.3f} | {r['test_ppl']:.3f} | "
                     f"{100 * (r['wgs'] or 0):.1f} | {r['zero_groups']} / {r['num_groups']} | "
                     f"{'-'.join(map(str, r['heads_kept']))} | {'-'.join(map(str, r['ffn_kept']))} | "
                     f"{r['params_after']:,} / {r['params_before']:,} | {sp[0]} | {sp[1]} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    colors = {"ramda": "tab:red", "rmda": "tab:blue", "proxgen": "tab:green", "proxsgd": "tab:purple",
              "adamw": "black"}
    runs, chosen = results["runs"], results.get("chosen", {})
    nb = results["args"]["ort_batch"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    extra = {k: r for k, r in (results.get("extra_runs") or {}).items() if "error" not in r}
    for solver in NAMES:
        keys = sorted((k for k in runs if k.split("_lam")[0] == solver and "error" not in runs[k]),
                      key=lambda k: runs[k]["lam"])
        if not keys:
            continue
        pts = [(100 * (runs[k]["wgs"] or 0.0), runs[k]["val_ppl"]) for k in keys]
        a1.plot(*zip(*pts), "-o" if solver != "adamw" else "*", ms=6 if solver != "adamw" else 12,
                color=colors[solver], label=solver)
        for k, (x, y) in zip(keys, pts):
            if solver != "adamw":
                a1.annotate(f"{runs[k]['lam']:g}" + ("*" if k in chosen.values() else ""), (x, y), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ekeys = sorted((k for k in extra if k.split("_lam")[0] == solver), key=lambda k: extra[k]["lam"])
        if ekeys:  # extra lam points (not part of the selection): the whole path, dashed, open markers
            lam_path = sorted([(runs[k]["lam"], k, runs[k]) for k in keys] +
                              [(extra[k]["lam"], k, extra[k]) for k in ekeys], key=lambda t: t[0])
            a1.plot([100 * (r["wgs"] or 0.0) for _, _, r in lam_path], [r["val_ppl"] for _, _, r in lam_path], "--",
                    color=colors[solver], lw=0.8)
            for k in ekeys:
                x, y = 100 * (extra[k]["wgs"] or 0.0), extra[k]["val_ppl"]
                a1.plot([x], [y], "o", mfc="none", color=colors[solver])
                a1.annotate(f"{extra[k]['lam']:g} (extra)", (x, y), fontsize=7, xytext=(3, -9),
                            textcoords="offset points")
        rows = [runs[k] for k in keys] + [extra[k] for k in ekeys]
        sp = [(r["val_ppl"], r.get(f"speedup_b{nb}"), r.get("speedup_b1")) for r in rows
              if r.get(f"speedup_b{nb}") is not None]
        if sp:
            a2.plot([p for p, _, _ in sp], [s for _, s, _ in sp], "o", color=colors[solver], label=f"{solver} b{nb}")
            a2.plot([p for p, _, _ in sp], [s for _, _, s in sp], "x", color=colors[solver], label=f"{solver} b1")
    if "adamw" in runs:
        a2.axvline(runs["adamw"]["val_ppl"], color="black", ls=":", lw=1, label="AdamW val ppl")
    a2.axhline(1.0, color="gray", lw=0.8)
    a1.set_yscale("log")
    a1.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    a1.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    a1.set_xlabel("weighted group sparsity (%)")
    a1.set_ylabel("validation perplexity (per character)")
    a1.set_title("Austen char LM: perplexity vs structure (lam labels; * chosen)", fontsize=9)
    a1.legend(fontsize=8)
    a2.set_xlabel("validation perplexity")
    a2.set_ylabel("ONNX Runtime speedup (dense p50 / slim p50)")
    a2.set_title(f"slim-model speedup, batch 1 (x) and {nb} (o)", fontsize=9)
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main

SETTINGS = ("seq_len", "limit_chars", "d_model", "n_heads", "n_layers", "d_ff", "batch_size", "epochs",
            "steps_per_epoch", "milestone", "seed")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--limit-chars", type=int, default=None, help="use only the first N characters (quick runs)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps-per-epoch", type=int, default=200)
    p.add_argument("--milestone", type=int, default=4, help="the final stage (restart + momentum ramp) starts after "
                                                               "this epoch; it needs >= 100 steps to reach c = 1")
    p.add_argument("--lams", type=float, nargs="+", default=[3e-5, 1.5e-4])
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads for training")
    p.add_argument("--ort-threads", type=int, default=2)
    p.add_argument("--ort-batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--verify-windows", type=int, default=16)
    p.add_argument("--epoch-val-windows", type=int, default=512, help="validation windows scored after each epoch "
                                                                       "(the final score uses all)")
    p.add_argument("--val-tol", type=float, default=0.05, help="lam selection: val perplexity <= (1 + tol) x AdamW's")
    p.add_argument("--timing-rounds", type=int, default=5)
    p.add_argument("--timing-steps", type=int, default=20)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--skip-adamw", action="store_true", help="no AdamW row (extra lam points in a separate JSON)")
    p.add_argument("--onnx-dir", default="runs/austen_lm")
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--plot", default=DEFAULT_PLOT)
    p.add_argument("--quick", action="store_true", help="smoke version: 300k characters, a 2-layer 64-wide model, "
                                                          "2 epochs of 40 steps, one lam")
    p.add_argument("--table", action="store_true", help="print the markdown table of --json and exit")
    p.add_argument("--noise-floor", type=int, default=0, metavar="N", help="only measure the ORT speedup of the dense "
                                                                            "model against itself N times (adds "
                                                                            "ort_noise_floor to --json) and exit")
    p.add_argument("--plot-only", action="store_true", help="redraw --plot from --json and exit")
    p.add_argument("--merge-extra", metavar="JSON", help="add the runs of another austen_lm JSON (same settings, e.g. "
                                                          "extra lams run with --skip-adamw) to --json as extra_runs "
                                                          "(not used for the lam choice), redraw the plot and exit")
    args = p.parse_args(argv)
    if args.table:
        results = json.loads(Path(args.json).read_text())
        print(markdown_table(results))
        if results.get("extra_runs"):
            print()
            print(extra_table(results))
        return 0
    if args.merge_extra:  # extra lam points from another JSON of the same settings; never used for the choice
        jpath = Path(args.json)
        results, extra = json.loads(jpath.read_text()), json.loads(Path(args.merge_extra).read_text())
        if extra["settings"] != results["settings"]:
            raise SystemExit(f"{args.merge_extra} was run with other settings: {extra['settings']}")
        results.setdefault("extra_runs", {}).update(extra["runs"])
        results.setdefault("extra_commands", []).append(extra["command"])
        jpath.write_text(json.dumps(results, indent=1, default=float))
        plot(results, Path(args.plot))
        return 0
    if args.plot_only:
        plot(json.loads(Path(args.json).read_text()), Path(args.plot))
        return 0
    if args.noise_floor:
        jpath = Path(args.json)
        results = json.loads(jpath.read_text())
        results["ort_noise_floor"] = noise_floor(args, load_data(args), args.noise_floor)
        results["ort_noise_floor"]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        jpath.write_text(json.dumps(results, indent=1, default=float))
        print(json.dumps(results["ort_noise_floor"], indent=1))
        return 0
    if args.quick:
        args.limit_chars, args.d_model, args.n_heads, args.d_ff, args.seq_len = 300_000, 64, 4, 128, 64
        args.batch_size, args.epochs, args.steps_per_epoch, args.milestone = 16, 2, 40, 1
        args.lams, args.warmup, args.runs, args.ort_batch = [args.lams[-1]], 2, 5, 8
        args.timing_rounds, args.timing_steps, args.epoch_val_windows = 2, 5, 128
        args.onnx_dir += "_quick"  # smoke outputs stay out of benchmarks/results and docs/img unless asked
        args.json = (str(Path(args.onnx_dir) / "austen_lm_quick.json") if args.json == DEFAULT_JSON
                     else args.json.replace(".json", "_quick.json"))
        args.plot = (str(Path(args.onnx_dir) / "bench_lm_quick.png") if args.plot == DEFAULT_PLOT
                     else args.plot.replace(".png", "_quick.png"))
    from structkit.deploy import environment
    torch.set_num_threads(args.threads)
    jpath = Path(args.json)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(jpath.read_text()) if jpath.is_file() else {}
    settings = {k: getattr(args, k) for k in SETTINGS}
    if results.get("settings") != settings:
        results = {}
    splits = load_data(args)
    results.update({"args": vars(args), "settings": settings,
                    "command": "python benchmarks/austen_lm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment(),
                    "data": {"vocab": splits.num_classes, "train_windows": len(splits.train),
                             "val_windows": len(splits.val), "test_windows": len(splits.test),
                             "seq_len": args.seq_len, "unigram_val_ppl": unigram_ppl(splits),
                             "train_chars_seen": args.epochs * args.steps_per_epoch * args.batch_size * args.seq_len},
                    "runs": results.get("runs", {})})

    def save():
        results["chosen"] = choose(results, args.val_tol)
        jpath.write_text(json.dumps(results, indent=1, default=float))

    plan = ([] if args.skip_adamw else [("adamw", 0.0)]) + [(s, lam) for lam in args.lams for s in args.solvers]
    for name, lam in plan:
        key = "adamw" if name == "adamw" else f"{name}_lam{lam:g}"
        if key in results["runs"] and "error" not in results["runs"][key]:
            continue
        t0 = time.perf_counter()
        try:
            row = train_row(args, splits, name, lam, Path(args.onnx_dir))
        except Exception as exc:  # keep going: a failed run is recorded, not hidden
            row = {"solver": name, "lam": lam, "error": f"{type(exc).__name__}: {exc}"}
            print(f"[{key}] FAILED: {row['error']}", flush=True)
        else:
            row["wall_s"] = time.perf_counter() - t0
            print(f"[{key}] val ppl {row['val_ppl']:.3f} (last-epoch subset {row['curve'][-1]['val_ppl_subset']:.3f}, slim {row['slim_val_ppl_subset']:.3f}) test {row['test_ppl']:.3f} "
                  f"wgs {row['wgs'] or 0:.3f} heads {row['heads_kept']} ffn {row['ffn_kept']} params "
                  f"{row['params_after']:,}/{row['params_before']:,} verify {row['verify_max_abs_diff']:.2e} "
                  f"speedup b1 {row.get('speedup_b1')} b{args.ort_batch} {row.get(f'speedup_b{args.ort_batch}')} "
                  f"({row['wall_s']:.0f}s)", flush=True)
        results["runs"][key] = row
        save()
    if not args.no_timing:
        results["step_timing"] = interleaved_timing(args, splits, args.timing_rounds, args.timing_steps)
        print("step time / AdamW:", {k: round(v, 3) for k, v in results["step_timing"]["ratio_to_adamw"].items()},
              flush=True)
        save()
    plot(results, Path(args.plot))
    print(markdown_table(results))
    print(json.dumps({"chosen": results["chosen"], "unigram_val_ppl": results["data"]["unigram_val_ppl"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
