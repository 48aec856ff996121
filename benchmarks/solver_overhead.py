"""Optimizer step cost of each structkit solver vs torch.optim.AdamW, built the way a user builds them.

For each model (torchvision, random init): the structure comes from a structure rule, as in a config
(``{select: "*", types: [Conv2d], kind: channels, lam}``: every conv's output channels with its BatchNorm,
coupled through residual adds by the dependency graph), the solver from ``get_solver(name)`` with
``groupset.param_groups()`` and the defaults in benchmarks/defaults.py; AdamW is ``torch.optim.AdamW`` with its
defaults (torch picks the implementation: the single-tensor one on CPU); ``adamw_foreach`` (its multi-tensor
implementation) is timed as one more row. Gradients come from one real backward pass at batch 32 (224 x 224)
and are set before every step, so only ``optimizer.step()`` is timed. Default allocator and threads. The
optimizers are timed round-robin (one step of each per round, so machine drift hits all alike) after warm-up
steps; the table gives each median and its ratio to AdamW's median in the same run.

``--train-step`` also times whole training steps (forward + backward + step at batch 32, ``--train-size``
pixels) for RAMDA and AdamW, round-robin.

    python benchmarks/solver_overhead.py                      # resnet18 + resnet50, writes the JSON
    python benchmarks/solver_overhead.py --quick              # smoke: resnet18, 3 rounds, no JSON
    python benchmarks/solver_overhead.py --render docs/benchmarks.md   # table from the JSON into the doc

Writes benchmarks/results/solver_overhead.json: ``rows`` with ``model, solver, device, step_ms, adamw_step_ms,
ratio`` (and ``what``: ``optimizer_step`` or ``train_step``), plus the environment.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defaults import SOLVERS  # noqa: E402

from structkit.solvers import get_solver  # noqa: E402
from structkit.structure import group_parameters  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "solver_overhead.json"
BEGIN, END = "<!-- solver_overhead:begin -->", "<!-- solver_overhead:end -->"


def channel_groups(model, device: torch.device, lam: float):
    """Every conv's output channels (with its BatchNorm), as the config rule below builds them."""
    return group_parameters(model, torch.randn(2, 3, 64, 64, device=device),
                            [{"select": "*", "types": ["Conv2d"], "kind": "channels", "lam": lam}])


def build(arch: str, device: torch.device):
    """The model and real gradients (one batch of 32 at 224 x 224)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).to(device)
    x = torch.randn(32, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (32,), device=device)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return model, grads


def make_optimizer(name: str, model, groupset):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if name == "adamw_foreach":  # AdamW's multi-tensor implementation, a stricter reference on CPU
        return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    return get_solver(name)(groupset.param_groups(), **SOLVERS[name])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copies(base, names, device, lam):
    """``name -> (a copy of base, its optimizer built through the public API)``."""
    runs = {}
    for name in names:
        model = copy.deepcopy(base)
        runs[name] = (model, make_optimizer(name, model, channel_groups(model, device, lam)))
    return runs


def time_optimizer_steps(arch, device, lam, solvers, rounds, warmup):
    base, grads = build(arch, device)
    runs = copies(base, ["adamw", *solvers], device, lam)
    times = {name: [] for name in runs}
    for r in range(warmup + rounds):
        for name, (model, opt) in runs.items():
            for n, p in model.named_parameters():
                p.grad = grads[n]
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    stats = {name: opt.solver_stats() for name, (_, opt) in runs.items() if hasattr(opt, "solver_stats")}
    return times, stats


def time_train_steps(arch, device, lam, rounds, warmup, size):
    base, _ = build(arch, device)
    runs = copies(base, ["adamw", "ramda"], device, lam)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (32,), generator=g).to(device)
    times = {name: [] for name in runs}
    for r in range(warmup + rounds):
        for name, (model, opt) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def render(doc: Path, results: Path = RESULTS) -> None:
    """Replace the block between the markers in ``doc`` with a table made from the JSON file."""
    data = json.loads(results.read_text())
    env = data["environment"]
    lines = [BEGIN,
             f"Measured {env['date']} on {env['cpu']} ({env['threads']} threads, device {env['device']}), torch "
             f"{env['torch']}, default allocator, load average {env['load_avg_start']:.1f} at the start and "
             f"{env['load_avg_end']:.1f} at the end; {env['rounds']} timed rounds after {env['warmup']} warm-up, "
             "medians. Generated from `benchmarks/results/solver_overhead.json` by "
             "`python benchmarks/solver_overhead.py --render docs/benchmarks.md`.", "",
             "| model | what | solver | step (ms) | AdamW step (ms) | x AdamW | inner iters (mean / max) |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        inner = "" if r.get("mean_inner_iters") is None else f"{r['mean_inner_iters']:.2f} / {r['max_inner_iters']}"
        lines.append(f"| {r['model']} | {r['what']} | {r['solver']} | {r['step_ms']:.1f} | {r['adamw_step_ms']:.1f} | "
                     f"{r['ratio']:.2f} | {inner} |")
    lines.append(END)
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} block to fill in.")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(head + "\n".join(lines) + rest.split(END, 1)[1])
    print(f"wrote the table into {doc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--solvers", nargs="+", default=["ramda", "rmda", "proxsgd", "proxgen", "adamw_foreach"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lam", type=float, default=1e-4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--train-step", action="store_true", help="also time forward + backward + step (RAMDA, AdamW)")
    ap.add_argument("--train-size", type=int, default=128, help="image size of the --train-step batches")
    ap.add_argument("--quick", action="store_true", help="resnet18, 3 rounds, 1 warm-up, no JSON unless --json")
    ap.add_argument("--json", help=f"where to write the results (default {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS})")
    ap.add_argument("--render", metavar="DOC", help="only write the table from the JSON into DOC and exit")
    args = ap.parse_args()
    if args.render:
        render(Path(args.render), Path(args.json) if args.json else RESULTS)
        return
    if args.quick:
        args.models, args.rounds, args.warmup = ["resnet18"], 3, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu.")
    rows, load_start = [], os.getloadavg()[0]
    print("| model | what | solver | step (ms) | AdamW (ms) | x AdamW |")
    for arch in args.models:
        times, stats = time_optimizer_steps(arch, device, args.lam, args.solvers, args.rounds, args.warmup)
        ref = statistics.median(times["adamw"])
        for name in args.solvers:
            med = statistics.median(times[name])
            s = stats.get(name, {})
            rows.append({"model": arch, "what": "optimizer_step", "solver": name, "device": str(device),
                         "step_ms": 1e3 * med, "adamw_step_ms": 1e3 * ref, "ratio": med / ref,
                         "mean_inner_iters": s.get("mean_inner_iters"), "max_inner_iters": s.get("max_inner_iters")})
            print(f"| {arch} | optimizer_step | {name} | {1e3 * med:.1f} | {1e3 * ref:.1f} | {med / ref:.2f} |", flush=True)
        if args.train_step:
            times = time_train_steps(arch, device, args.lam, max(3, args.rounds // 3), 2, args.train_size)
            ref, med = statistics.median(times["adamw"]), statistics.median(times["ramda"])
            rows.append({"model": arch, "what": f"train_step_b32_{args.train_size}px", "solver": "ramda",
                         "device": str(device), "step_ms": 1e3 * med, "adamw_step_ms": 1e3 * ref, "ratio": med / ref})
            print(f"| {arch} | train_step b32 {args.train_size}px | ramda | {1e3 * med:.1f} | {1e3 * ref:.1f} | "
                  f"{med / ref:.2f} |", flush=True)
    env = {"device": str(device), "cpu": cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds,
           "warmup": args.warmup, "lam": args.lam, "date": time.strftime("%Y-%m-%d %H:%M"),
           "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0]}
    out = Path(args.json) if args.json else (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
