"""Which `prune(..., round_to=N)` default serves ONNX Runtime best: None, 8 or 16?

The 5-conv BatchNorm CNN (32-32-64-64-128) gets zero channel groups leaving the unaligned widths a 5-epoch
RAMDA run left (18-29-55-44-128, docs/deployment.md) or another pattern (--widths); it is pruned with
round_to None / 8 / 16 (each verified exact by prune) and the dense model and the three slim models are timed
together, interleaved, with structkit.deploy.measure_latency at each model's fastest ORT setting.

    python benchmarks/round_to.py [--widths 18 29 55 44 128] [--runs 200] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import structkit
from structkit.deploy import environment, export_onnx, measure_latency
from structkit.models import get_model

DENSE = (32, 32, 64, 64, 128)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs=5, default=[18, 29, 55, 44, 128])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.warmup = 10, 3
    torch.manual_seed(0)
    model = get_model("cnn", input_shape=(1, 28, 28), num_classes=10, widths=DENSE).eval()
    x = torch.randn(2, 1, 28, 28)
    gs = structkit.group_parameters(model, x, [{"kind": "channels", "lam": 1e-3}])
    for block, keep in zip(gs.blocks, args.widths):
        ids = gs.groups_of(block)
        gs.zero_(ids[torch.randperm(len(ids))[: len(ids) - keep]])
    variants = {"dense": None}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx"}
        export_onnx(model, x, paths["dense"])
        widths = {"dense": list(DENSE)}
        for r in (None, 8, 16):
            name = f"round_to={r}"
            slim, report = structkit.prune(model, gs, x, round_to=r)
            rep = report.to_dict()
            widths[name] = [layer["after"] for layer in rep["layers"].values()]
            paths[name] = Path(tmp) / f"slim_{r}.onnx"
            export_onnx(slim, x, paths[name])
            variants[name] = rep
        lat = measure_latency(paths, lambda b: {"input": np.random.default_rng(0).standard_normal((b, 1, 28, 28), dtype=np.float32)},
                              batch_sizes=(1, 64), runs=args.runs, warmup=args.warmup)
    print(f"# CNN {'-'.join(map(str, DENSE))} -> zero groups leaving {'-'.join(map(str, args.widths))}; "
          f"{args.runs} interleaved runs, {datetime.date.today()}, {environment().get('cpu')}")
    print("| variant | widths | MACs | b1 p50 ms | b1 speedup | b64 p50 ms | b64 speedup | ORT level b64 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in paths:
        rep = variants[name] or {"macs_after": variants["round_to=None"]["macs_before"]}
        row = [name, "-".join(map(str, widths[name])), f"{rep['macs_after'] / 1e6:.1f}M"]
        for b in ("1", "64"):
            p50 = lat[b][f"{name}_p50_ms"]
            row += [f"{p50:.3f}", f"{lat[b]['dense_p50_ms'] / p50:.2f}x"]
        row.append(lat["64"]["settings"][name])
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"latency": lat, "reports": variants}, indent=2, default=str))


if __name__ == "__main__":
    main()
