"""Optimizer step time of each structkit solver vs torch.optim.AdamW(foreach=True), same run, same weights.

Weights: torchvision resnet50 (random init, 25.6M parameters); gradients: fixed synthetic tensors (so only
the optimizer is timed). Conv weights get filter-wise group lasso (group_dim=0), the rest is unregularized.
Solvers are timed round-robin (one step of each per round, so machine drift hits all alike); the table gives
the median step time and its ratio to AdamW's median. A second table checks RAMDA's subproblem solution
against a float64 exact solve of the same subproblem.

    python benchmarks/solver_overhead.py            # full: 30 timed rounds
    python benchmarks/solver_overhead.py --quick    # smoke: small model, 5 rounds
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torchvision

from structkit.regularizers import get_regularizer
from structkit.runtime import reuse_freed_memory
from structkit.solvers import RAMDA, RMDA, ProxGen, ProxSGD
from structkit.solvers.subproblem import solve_subproblem


def param_groups(model, lam):
    convs = [p for n, p in model.named_parameters() if p.dim() == 4]
    rest = [p for n, p in model.named_parameters() if p.dim() != 4]
    return [{"params": convs, "regularizer": "group_lasso", "lam": lam, "group_dim": 0}, {"params": rest}]


def make_solvers(model, lam):
    def groups():
        return param_groups(model, lam)
    return {
        "AdamW (foreach)": torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True),
        "RAMDA, exact group-lasso solve": RAMDA(groups(), lr=1e-2, momentum=1e-2, subproblem="exact"),
        "RAMDA, proximal gradient": RAMDA(groups(), lr=1e-2, momentum=1e-2, subproblem="pg"),
        "RMDA": RMDA(groups(), lr=0.1, momentum=0.1),
        "ProxSGD": ProxSGD(groups(), lr=0.1),
        "ProxGen": ProxGen(groups(), lr=1e-3),
    }


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="resnet18 and 5 rounds")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lam", type=float, default=1e-4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--malloc-tuning", action="store_true",
                    help="call structkit.runtime.reuse_freed_memory() first, as the CLI does")
    args = ap.parse_args()
    rounds = 5 if args.quick else args.rounds
    tuned = reuse_freed_memory() if args.malloc_tuning else False
    device = torch.device(args.device)
    torch.manual_seed(0)
    arch = "resnet18" if args.quick else "resnet50"
    base = torchvision.models.get_model(arch, weights=None).to(device)
    grads = {n: torch.randn_like(p) * 1e-2 for n, p in base.named_parameters()}

    models, solvers = {}, {}
    import copy
    for name in make_solvers(base, args.lam):
        models[name] = copy.deepcopy(base)
        solvers[name] = make_solvers(models[name], args.lam)[name]

    def one_step(name):
        for n, p in models[name].named_parameters():
            p.grad = grads[n]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        solvers[name].step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times = {name: [] for name in solvers}
    for r in range(args.warmup + rounds):
        for name in solvers:
            dt = one_step(name)
            if r >= args.warmup:
                times[name].append(dt)
    ref = statistics.median(times["AdamW (foreach)"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        stats = solvers[name].solver_stats() if hasattr(solvers[name], "solver_stats") else {}
        rows.append({"solver": name, "median_ms": 1e3 * med, "ratio_vs_adamw": med / ref,
                     "mean_inner_iters": stats.get("mean_inner_iters"), "max_inner_iters": stats.get("max_inner_iters")})

    # subproblem accuracy: RAMDA's current conv subproblem, float32 solvers vs a float64 exact solve
    opt = solvers["RAMDA, exact group-lasso solve"]
    group = opt.param_groups[0]
    state, layout = opt.state[group["params"][0]], opt.group_layout(0)
    P = state["U"].pow(1 / 3) + group["eps"]
    z = state["W0"] - state["V"] / P
    tau = state["alpha"] * group["lam"]
    reg = get_regularizer("group_lasso")
    from structkit.layout import GroupLayout
    layout64 = GroupLayout(layout.shapes, layout.indices, device=device, dtype=torch.float64)
    exact64 = reg.prox_diag(z.double(), P.double(), tau, layout64)
    w = layout.flatten(group["params"])
    accuracy = []
    for method in ("exact", "pg"):
        sol, info = solve_subproblem(reg, z, P, tau, layout, warm_start=w,
                                     rtol=group["inner_tol"], method=method)
        sol = sol.detach()
        err = torch.linalg.vector_norm(sol.double() - exact64) / torch.linalg.vector_norm(exact64)
        same_zeros = bool(((layout64.norms(sol.double()) == 0) == (layout64.norms(exact64) == 0)).all())
        accuracy.append({"method": method, "rel_error_vs_float64_exact": float(err), "inner_iters": info.iters,
                         "same_zero_groups": same_zeros})

    env = {"model": arch, "params": sum(p.numel() for p in base.parameters()), "device": str(device),
           "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": rounds,
           "malloc_tuning": tuned,
           "date": time.strftime("%Y-%m-%d")}
    print(f"# {arch} ({env['params'] / 1e6:.1f}M params) on {device} ({env['cpu']}, {env['threads']} threads), "
          f"{rounds} rounds, median step time, malloc tuning {'on' if tuned else 'off'}")
    print("| solver | median step (ms) | x AdamW | mean / max inner iters |")
    print("|---|---|---|---|")
    for r in rows:
        inner = "" if r["mean_inner_iters"] is None else f"{r['mean_inner_iters']:.1f} / {r['max_inner_iters']}"
        print(f"| {r['solver']} | {r['median_ms']:.1f} | {r['ratio_vs_adamw']:.2f} | {inner} |")
    print("\n| subproblem method | rel. error vs float64 exact | inner iters | same zero groups |")
    print("|---|---|---|---|")
    for a in accuracy:
        print(f"| {a['method']} | {a['rel_error_vs_float64_exact']:.1e} | {a['inner_iters']} | {a['same_zero_groups']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "steps": rows, "subproblem": accuracy}, f, indent=2)


if __name__ == "__main__":
    main()
