"""Which exporter and which ONNX Runtime graph optimization level make dense and slim models fastest on this CPU.

This is the measurement behind docs/deployment.md. Models (random weights: latency does not depend on values),
1x28x28 inputs, 10 classes, built with ``structkit.models.get_model``:

* ``cnn`` (5 convolutions with BatchNorm, two max-pools, global average pool, linear): dense widths
  32-32-64-64-128, slim 16-16-32-32-128 (aligned to ONNX Runtime's channel blocks) and 18-29-55-44-128 (unaligned,
  what a short RAMDA run left);
* ``mlp``: dense 784-512-512-10, slim 784-256-256-10.

Every model is exported with both exporters (``export_onnx``, verified against torch). Table 1: per family, all
(widths, exporter, level) variants -- level "all" or "extended" -- are timed together in one interleaved
``measure_latency`` run at batch 1 and 64, so every variant sees the same machine (separate runs per level
differed by up to 1.5x for identical optimized graphs on this shared machine). Table 2: the protocol the
pipeline uses -- dense vs each slim model, one exporter, ``graph_optimization="fastest"``. Table 3: why that
protocol keeps ONNX Runtime's worker threads from spinning (one session timed next to others, spinning on/off).

    python benchmarks/ort_settings.py               # full: 20 warm-up and 200 timed rounds
    python benchmarks/ort_settings.py --quick       # smoke test: 3 warm-up and 10 timed rounds
    python benchmarks/ort_settings.py --json results.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from structkit.deploy import environment, export_onnx, measure_latency, ort_session
from structkit.models import get_model

INPUT_SHAPE = (1, 28, 28)
FAMILIES = {
    "cnn": {"dense": (32, 32, 64, 64, 128), "slim aligned": (16, 16, 32, 32, 128),
            "slim unaligned": (18, 29, 55, 44, 128)},
    "mlp": {"dense": (512, 512), "slim": (256, 256)},
}
EXPORTERS = ("torchscript", "dynamo")
LEVELS = ("all", "extended")


def macs(model: nn.Module) -> int:
    """Multiply-accumulates of one forward pass on one image (convolutions and linear layers)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output[0].numel() * module.weight[0].numel()
        else:
            total += module.weight.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, *INPUT_SHAPE))
    for hook in hooks:
        hook.remove()
    return total


def make_inputs(batch: int) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(batch).standard_normal((batch, *INPUT_SHAPE), dtype=np.float32)}


def export_all(folder: Path) -> tuple[dict, dict]:
    """Export every model with every exporter; returns paths[family][variant][exporter] and MACs[family][variant]."""
    paths, counts = {}, {}
    for family, variants in FAMILIES.items():
        paths[family], counts[family] = {}, {}
        for variant, widths in variants.items():
            torch.manual_seed(0)
            model = get_model(family, input_shape=INPUT_SHAPE, num_classes=10, widths=widths).eval()
            counts[family][variant] = macs(model)
            stem = f"{family}-{variant.replace(' ', '_')}"
            paths[family][variant] = {
                exporter: export_onnx(model, torch.randn(2, *INPUT_SHAPE), folder / f"{stem}-{exporter}.onnx",
                                      exporter=exporter)["path"]
                for exporter in EXPORTERS}
    return paths, counts


def settings_table(paths: dict, counts: dict, batch_sizes: tuple[int, ...], warmup: int, runs: int) -> tuple[str, dict]:
    """Table 1: p50 latency of every (family, widths, exporter) at every level and batch size."""
    raw = {}
    for family, variants in paths.items():
        models = {f"{variant} {exporter} {level}": path for variant, by_exporter in variants.items()
                  for exporter, path in by_exporter.items() for level in LEVELS}
        levels = {name: name.rsplit(" ", 1)[1] for name in models}
        raw[family] = measure_latency(models, make_inputs, batch_sizes, warmup=warmup, runs=runs,
                                      graph_optimization=levels)
    columns = [(b, level) for b in batch_sizes for level in LEVELS]
    header = " | ".join(f"b{b} {level}" for b, level in columns)
    lines = [f"| model | widths | MMACs/image | exporter | {header} |", "|---|---|---|---|" + "---|" * len(columns)]
    for family, variants in paths.items():
        for variant, by_exporter in variants.items():
            widths = "-".join(map(str, FAMILIES[family][variant]))
            for exporter in by_exporter:
                cells = [f"{raw[family][str(b)][f'{variant} {exporter} {level}_p50_ms']:.3f}" for b, level in columns]
                lines.append(f"| {family} {variant} | {widths} | {counts[family][variant] / 1e6:.2f} | {exporter} | "
                             + " | ".join(cells) + " |")
    return "\n".join(lines), raw


def protocol_table(paths: dict, exporter: str, batch_sizes: tuple[int, ...], warmup: int,
                   runs: int) -> tuple[str, dict]:
    """Table 2: dense vs each slim model under measure_latency's default protocol (fastest level per model)."""
    raw = {}
    lines = ["| pair | batch | dense level | slim level | dense p50 / p90 ms | slim p50 / p90 ms | speedup (p50) |",
             "|---|---|---|---|---|---|---|"]
    for family, variants in paths.items():
        for variant in variants:
            if variant == "dense":
                continue
            models = {"dense": variants["dense"][exporter], "slim": variants[variant][exporter]}
            result = measure_latency(models, make_inputs, batch_sizes, warmup=warmup, runs=runs,
                                     graph_optimization="fastest")
            raw[f"{family} {variant}"] = result
            for b in batch_sizes:
                row = result[str(b)]
                lines.append(f"| {family} dense vs {variant} | {b} | {row['settings']['dense']} | "
                             f"{row['settings']['slim']} | {row['dense_p50_ms']:.3f} / {row['dense_p90_ms']:.3f} | "
                             f"{row['slim_p50_ms']:.3f} / {row['slim_p90_ms']:.3f} | {row['speedup']:.2f}x |")
    return "\n".join(lines), raw


def spinning_table(path: str, threads: int, warmup: int, runs: int, passes: int = 3) -> tuple[str, dict]:
    """Table 3: why measure_latency turns spinning off. p50 of one dense CNN session at batch 64 while 0, 1 or 5
    other sessions of the same model run interleaved with it, with ONNX Runtime's spinning worker threads on/off.
    The six configurations cannot run interleaved with each other, so they run in ``passes`` passes (order reversed
    every other pass) and the table gives the median and range over passes."""
    feed = make_inputs(64)
    configs = [(spinning, count) for spinning in (True, False) for count in (1, 2, 6)]
    raw = {f"spinning={spinning} sessions={count}": [] for spinning, count in configs}
    for p in range(passes):
        for spinning, count in configs if p % 2 == 0 else configs[::-1]:
            sessions = [ort_session(path, threads=threads, spinning=spinning) for _ in range(count)]
            seconds = []
            for r in range(warmup + runs):
                for session in sessions if r % 2 == 0 else sessions[::-1]:
                    start = time.perf_counter()
                    session.run(None, feed)
                    if session is sessions[0] and r >= warmup:
                        seconds.append(time.perf_counter() - start)
            raw[f"spinning={spinning} sessions={count}"].append(float(np.median(seconds) * 1e3))
    lines = ["| intra-op threads | 1 session | 2 sessions interleaved | 6 sessions interleaved |", "|---|---|---|---|"]
    for spinning in (True, False):
        p50s = [raw[f"spinning={spinning} sessions={count}"] for count in (1, 2, 6)]
        cells = [f"{np.median(x):.1f} ({min(x):.1f}-{max(x):.1f})" for x in p50s]
        label = "spin (ORT default)" if spinning else "sleep (measure_latency)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines), raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 warm-up and 10 timed rounds (smoke test)")
    parser.add_argument("--runs", type=int, default=200, help="timed interleaved rounds (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up rounds (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                        help="exporter of the dense-vs-slim protocol table (default torchscript)")
    parser.add_argument("--json", type=Path, help="also write all raw results to this file")
    args = parser.parse_args()
    warmup, runs = (3, 10) if args.quick else (args.warmup, args.runs)
    torch.set_num_threads(args.threads)
    batch_sizes = (1, 64)
    spin_rounds = max(1, runs // 5)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        paths, counts = export_all(Path(folder))
        table1, raw1 = settings_table(paths, counts, batch_sizes, warmup, runs)
        table2, raw2 = protocol_table(paths, args.exporter, batch_sizes, warmup, runs)
        table3, raw3 = spinning_table(paths["cnn"]["dense"][args.exporter], args.threads, warmup, spin_rounds)
    env = {**environment(), "date": datetime.date.today().isoformat(), "load_average_before": load_before,
           "load_average_after": os.getloadavg()}

    print(f"## p50 latency (ms), {args.threads} threads, {runs} interleaved rounds after {warmup} warm-up\n")
    print(table1)
    print(f"\n## dense vs slim, graph_optimization='fastest', exporter {args.exporter}\n")
    print(table2)
    print(f"\n## batch-64 dense CNN p50 (ms) next to other sessions: median (range) of 3 passes of {spin_rounds} "
          f"rounds\n")
    print(table3)
    print("\n" + json.dumps(env, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "settings": raw1, "protocol": raw2,
                                               "spinning": raw3}, indent=1))


if __name__ == "__main__":
    main()
