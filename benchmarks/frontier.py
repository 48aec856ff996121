"""Equal-budget accuracy / speed frontier: structkit (RAMDA, ProxGen, each also with a fixed final stage) against
Torch-Pruning (magnitude, Taylor, GroupNormPruner) at MACs targets of 1/1.5, 1/2 and 1/3 of the dense model
(issue 14, item 5).

Protocol (one row = one model, method, MACs target, seed):

- Pruned layers: the output channels of every convolution (the classifier is never pruned); channels are removed in
  multiples of 16 (``round_to=16``: ONNX Runtime's AVX-512 convolutions work in blocks of 16 channels).
- Budget: every method gets ``--epochs`` (E_train) training epochs plus ``--ft-epochs`` (E_ft) fine-tuning epochs of
  the pruned model, on the same data (Fashion-MNIST, the first ``--limit-train`` training images, the same
  validation/test splits), the same batch size and seeds.
- The same fine-tune for every method: ``structkit.finetune.finetune`` with one ``FinetuneConfig`` (AdamW lr 1e-3 with
  cosine decay, distilled from the method's own trained model before pruning: T 4, alpha 0.5), and BatchNorm
  recalibration (``structkit.training.recalibrate_batchnorm``, 20 fixed training batches) after pruning and after
  fine-tuning.
- ``tp_magnitude`` / ``tp_taylor``: the dense model trained E_train epochs with AdamW (benchmarks/defaults.py's
  rate, constant), shared by both methods and all targets; pruned once per target with ``tp.pruner.MetaPruner``
  (``GroupMagnitudeImportance(p=2)`` / ``GroupTaylorImportance`` on the gradients summed over 8 training batches).
- ``tp_groupnorm``: E_train epochs of sparse training (AdamW; ``GroupNormPruner(reg=5e-4)``, the rate of
  Torch-Pruning's own CIFAR benchmark: ``update_regularizer()`` at every epoch, ``regularize(model)`` after every
  backward), shared by all targets, then pruned by the GroupNormPruner (group L2 importance).
- Torch-Pruning reaches a target by a search over the pruning ratio (``global_pruning=True``, ``--uniform`` for one
  ratio per layer): the ratio with the largest MACs <= the target, i.e. as close from below as ``round_to=16``
  allows, among a 0.05 grid and 6 halvings next to the best grid point (MACs are not monotone in the ratio: a layer
  whose share would leave too few channels is left whole, so plain bisection missed targets).
- ``ramda`` / ``proxgen``: one ``structkit.pipeline.run`` per row from a config dict, as a user would run it:
  structure rule ``{select: "*", types: [Conv2d], kind: channels}`` (structkit's channels kind couples every conv
  that shares channels, e.g. a ResNet's residual stream), ``compress: {target: {macs: 1/target}}`` (lam adapted
  during training, exactly the groups needed removed), the same ``finetune`` section; RAMDA lr 1e-2 (ResNet-18:
  1e-3, chosen on validation, see ``MODELS``), momentum 0.1, ProxGen lr 1e-3 (benchmarks/defaults.py), one restart stage at the last training epoch (``milestones:
  [E_train - 1]``, gamma 0.1). ``ramda_fixed``: the same with averaging momentum 0.5 and
  ``compress.final_stage: fixed`` (structkit/fixed_stage.py; ``SK_VARIANTS``); ``proxgen_fixed``: ProxGen with
  ``compress.final_stage: fixed``. Accuracies, MACs and params come from
  the run folder's report.json.
- ``dense`` reference rows: the AdamW model after E_train epochs (no pruning, no fine-tune).
- Accuracy: test split (10,000 images), after fine-tuning; ``acc_pruned`` is the accuracy right after pruning
  (and recalibration), ``acc_trained`` that of the model before pruning.
- Speed: dense and slim exported to ONNX (``structkit.deploy.export_onnx``, checked against torch) and timed at batch
  64 by ``structkit.deploy.measure_latency`` (interleaved in one process, 2 ORT threads, each model at its faster
  graph optimization level); ``speedup`` = dense p50 / slim p50. Rows are timed briefly when they finish; ``--time``
  re-times every finished row's ONNX files (more runs, all rows one after another) when the machine is quieter, and
  the JSON keeps which timing each row holds (``timing``).

Models: ``cnn`` (the quickstart CNN 32-32-64-64-128, 1x28x28) and ``resnet18`` (torchvision, on Fashion-MNIST resized
to 32x32 and repeated to 3 channels: ``data.options: {size: 32, channels: 3}``; no CIFAR-10 offline).

Commands of the 2026-12-03/04 runs (2 shared cores; several invocations side by side, 1 torch thread each;
measured epoch times are in the rows' ``train_epoch_seconds``). One invocation per model and method group; an
invocation may take a subset of the seeds or targets (``--seeds 2 --targets 3``) to run rows side by side:

    # 4,000 / 2,000 images (benchmarks/results/frontier.json)
    python benchmarks/frontier.py --models cnn --methods tp_magnitude tp_taylor tp_groupnorm ramda_fixed proxgen \
        --epochs 3 --ft-epochs 1 --limit-train 4000
    python benchmarks/frontier.py --models resnet18 --methods tp_magnitude tp_taylor tp_groupnorm ramda_fixed \
        --epochs 2 --ft-epochs 1 --limit-train 2000
    # 12,000 images (frontier_12k.json) and the full training set (frontier_60k.json)
    python benchmarks/frontier.py --models cnn --methods tp_magnitude tp_taylor tp_groupnorm ramda_fixed \
        --epochs 3 --ft-epochs 1 --limit-train 12000 --json benchmarks/results/frontier_12k.json
    python benchmarks/frontier.py --models cnn --methods tp_magnitude tp_groupnorm ramda_fixed \
        --epochs 3 --ft-epochs 1 --limit-train 0 --json benchmarks/results/frontier_60k.json
    python benchmarks/frontier.py --refresh          # structkit rows rebuilt from their report.json
    python benchmarks/frontier.py --time --runs 50   # re-time every finished row's ONNX pair
    python benchmarks/frontier.py --plot             # benchmarks/results/frontier.png
    python benchmarks/frontier.py --table            # markdown table, mean +- std over seeds
    python benchmarks/frontier.py --quick            # minutes-long smoke version (own JSON and run folder)

The ``dense`` reference row of (model, seed) is trained by an invocation with Torch-Pruning methods (the one these
share), so a structkit-only invocation next to it does not train it a second time.

Rows are written to ``--json`` one at a time (under a file lock, so several invocations, e.g. one per model, can
share it); a row already there is skipped, and the shared trainings and the structkit run folders under ``--out``
are reused, so an interrupted invocation continues where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.defaults import ADAMW, SOLVERS  # noqa: E402  (after the sys.path line)

TP_METHODS = ("tp_magnitude", "tp_taylor", "tp_groupnorm")
SK_METHODS = ("ramda", "proxgen", "ramda_fixed", "proxgen_fixed")
#: structkit variants: a method name -> (solver, config changes on top of the common config)
SK_VARIANTS = {"ramda": ("ramda", {}), "proxgen": ("proxgen", {}),
               # RAMDA with averaging momentum 0.5 and compress.final_stage fixed (structkit/fixed_stage.py)
               "ramda_fixed": ("ramda", {"optimizer": {"momentum": 0.5}, "compress": {"final_stage": "fixed"}}),
               # ProxGen with compress.final_stage fixed (no averaging momentum to change)
               "proxgen_fixed": ("proxgen", {"compress": {"final_stage": "fixed"}})}
METHODS = SK_METHODS + TP_METHODS
MODELS = {
    "cnn": {"model": {"name": "cnn", "options": {"widths": [32, 32, 64, 64, 128], "pool_after": [2, 4]}},
            "data": {}, "classifier": "classifier", "batch_size": 64},
    # RAMDA's lr for ResNet-18: the best validation accuracy of a dense (lam 0) 2-epoch RAMDA run on its 2,000
    # images (seed 0, momentum 0.5): lr 1e-2 (the CNN's) 0.378, 3e-3 0.669, 1e-3 0.756 (test 0.38 / 0.66 / 0.77;
    # AdamW at benchmarks/defaults.py's rate: 0.796 test)
    "resnet18": {"model": {"name": "resnet18", "options": {}}, "data": {"size": 32, "channels": 3},
                 "classifier": "fc", "batch_size": 64, "solver_lr": {"ramda": 1e-3}},
}
FINETUNE = {"lr": 1e-3, "weight_decay": 0.0, "distill": True, "temperature": 4.0, "alpha": 0.5}
GROUPNORM_REG = 5e-4   # Torch-Pruning's CIFAR benchmark rate for GroupNormPruner sparse training
TAYLOR_BATCHES = 8     # training batches whose summed gradients feed GroupTaylorImportance
RECAL_BATCHES = 20     # structkit's schedule.bn_recalibration_batches default
START_LAM = 5e-4       # structkit rows: lam at the start (compress.target adapts it)
ROUND_TO = 16
SEARCH_HALVINGS = 6   # Torch-Pruning ratio search: a 0.05 grid, then halvings next to the best point


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


# ------------------------------------------------------------------------------------------------ JSON (locked)

@contextlib.contextmanager
def locked(path: Path):
    """Read-modify-write of the results JSON under an exclusive lock (one invocation per model may run at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"structkit-frontier-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {"meta": {}, "rows": []}
        yield data
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=float))
        os.replace(tmp, path)


def row_key(row: dict) -> tuple:
    return row["model"], row["method"], float(row["target"]), int(row["seed"])


def find_row(data: dict, model: str, method: str, target: float, seed: int) -> dict | None:
    for row in data["rows"]:
        if row_key(row) == (model, method, float(target), int(seed)):
            return row
    return None


def put_row(jpath: Path, row: dict) -> None:
    with locked(jpath) as data:
        data["rows"] = [r for r in data["rows"] if row_key(r) != row_key(row)] + [row]


# ------------------------------------------------------------------------------------------------ data and models

def data_options(args, model: str) -> dict:
    return {"limit_train": args.limit_train or None, "val_fraction": args.val_fraction, **MODELS[model]["data"]}


def load_splits(args, model: str):
    from structkit.data import get_dataset
    return get_dataset("fashion_mnist", **data_options(args, model))


def new_model(args, model: str, splits, seed: int) -> torch.nn.Module:
    from structkit.models import get_model
    from structkit.pipeline import seed_everything
    seed_everything(seed)
    spec = MODELS[model]["model"]
    return get_model(spec["name"], input_shape=splits.input_shape, num_classes=splits.num_classes, **spec["options"])


def recalibration_batches(splits, batch_size: int, seed: int) -> list:
    """The pipeline's BatchNorm recalibration set: RECAL_BATCHES fixed random training batches (seeded seed + 1)."""
    g = torch.Generator().manual_seed(seed + 1)
    n = min(len(splits.train), RECAL_BATCHES * batch_size)
    idx = torch.randperm(len(splits.train), generator=g)[:n]
    x, y = splits.train.tensors
    return [(x[idx[i:i + batch_size]], y[idx[i:i + batch_size]]) for i in range(0, n, batch_size)]


def fit(model, loader, epochs: int, after_backward=None, before_epoch=None) -> list[float]:
    """AdamW (benchmarks/defaults.py rate, constant) for ``epochs`` epochs; ``after_backward()`` runs between
    backward and the optimizer step (GroupNormPruner's regularizer). Returns seconds per epoch."""
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    seconds = []
    for _ in range(epochs):
        if before_epoch is not None:
            before_epoch()
        model.train()
        t0 = time.perf_counter()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if after_backward is not None:
                after_backward()
            opt.step()
        seconds.append(time.perf_counter() - t0)
    return seconds


def macs_params(model, example) -> tuple[int, int]:
    import torch_pruning as tp
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


# ------------------------------------------------------------------------------------------------ Torch-Pruning

def shared_training(args, model: str, seed: int, kind: str, splits) -> tuple[torch.nn.Module, dict]:
    """The dense (``kind="dense"``) or GroupNormPruner sparse (``"groupnorm"``) training of (model, seed), E_train
    epochs, saved under --out and reused by every target (and by both magnitude and Taylor for the dense one)."""
    import torch_pruning as tp
    from structkit.data import make_loaders
    folder = Path(args.out) / model / f"s{seed}"
    path = folder / f"{kind}_e{args.epochs}.pt"
    net = new_model(args, model, splits, seed)
    if path.is_file():
        state = torch.load(path, weights_only=True)
        net.load_state_dict(state["model"])
        return net, {"epoch_seconds": state["epoch_seconds"].tolist()}
    train_loader, _, _ = make_loaders(splits, MODELS[model]["batch_size"], seed=seed)
    hooks = {}
    if kind == "groupnorm":
        example = splits.train.tensors[0][:1]
        pruner = tp.pruner.GroupNormPruner(net, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           reg=GROUPNORM_REG, global_pruning=not args.uniform,
                                           ignored_layers=[getattr(net, MODELS[model]["classifier"])],
                                           round_to=ROUND_TO)
        hooks = {"after_backward": lambda: pruner.regularize(net), "before_epoch": pruner.update_regularizer}
    t0 = time.perf_counter()
    seconds = fit(net, train_loader, args.epochs, **hooks)
    print(f"[{model} s{seed}] {kind} training: {args.epochs} epochs, {time.perf_counter() - t0:.0f}s "
          f"({', '.join(f'{s:.1f}' for s in seconds)} s/epoch)", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "epoch_seconds": torch.tensor(seconds)}, path)
    return net, {"epoch_seconds": seconds}


def taylor_gradients(net, splits, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Gradients of the training loss summed over TAYLOR_BATCHES training batches (GroupTaylorImportance's input)."""
    from structkit.data import make_loaders
    loader, _, _ = make_loaders(splits, batch_size, seed=seed + 11)
    net.train()  # BatchNorm in training mode, as during training
    net.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        if i == TAYLOR_BATCHES:
            break
        F.cross_entropy(net(x), y).backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return grads


def tp_prune(args, model: str, trained, method: str, target: float, example, grads=None):
    """Prune a copy of ``trained`` with Torch-Pruning so that its MACs are <= dense MACs / target, as close as the
    search over the pruning ratio finds (see the module docstring). Returns (slim, info)."""
    import torch_pruning as tp
    macs0, params0 = macs_params(trained, example)
    limit = macs0 / target

    def attempt(ratio: float):
        net = copy.deepcopy(trained).eval()
        if method == "tp_taylor":
            for n, p in net.named_parameters():
                p.grad = grads[n].clone() if n in grads else None
            importance = tp.importance.GroupTaylorImportance()
        else:
            importance = tp.importance.GroupMagnitudeImportance(p=2)
        cls = tp.pruner.GroupNormPruner if method == "tp_groupnorm" else tp.pruner.MetaPruner
        extra = {"reg": GROUPNORM_REG} if method == "tp_groupnorm" else {}
        pruner = cls(net, example, importance=importance, pruning_ratio=ratio, global_pruning=not args.uniform,
                     ignored_layers=[getattr(net, MODELS[model]["classifier"])], round_to=ROUND_TO, **extra)
        pruner.step()
        net.zero_grad(set_to_none=True)
        macs, params = macs_params(net, example)
        return net, macs, params

    # MACs are not monotone in the ratio (with round_to, a layer whose share would leave too few channels is left
    # whole, e.g. Taylor at 0.9 pruned nothing on the CNN), so: a grid, then halvings next to the best grid point;
    # the kept result is the largest MACs <= the limit seen anywhere.
    best, tried = None, {}

    def consider(ratio: float):
        nonlocal best
        if ratio in tried:
            return tried[ratio]
        try:
            net, macs, params = attempt(ratio)
        except Exception as exc:  # a ratio Torch-Pruning refuses: recorded as over the limit
            print(f"  ratio {ratio:.4f}: {type(exc).__name__}: {exc}", flush=True)
            tried[ratio] = None
            return None
        tried[ratio] = macs
        if macs <= limit and (best is None or macs > best[1]):
            best = (net, macs, params, ratio)
        return macs

    for ratio in np.round(np.arange(0.05, 0.951, 0.05), 4):
        consider(float(ratio))
    if best is not None:
        lo, hi = max(0.0, best[3] - 0.05), best[3]  # below the best grid point MACs were higher (or over)
        for _ in range(SEARCH_HALVINGS):
            mid = (lo + hi) / 2
            macs = consider(mid)
            if macs is not None and macs <= limit:
                hi = mid
            else:
                lo = mid
    if best is None:
        raise RuntimeError(f"no pruning ratio reached MACs <= {limit:,.0f} (dense {macs0:,}); tried "
                           f"{ {round(r, 4): m for r, m in sorted(tried.items())} }")
    net, macs, params, ratio = best
    widths = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    return net, {"pruning_ratio": ratio, "macs": macs, "params": params, "macs_dense": macs0,
                 "params_dense": params0, "widths": widths, "ratio_search": len(tried)}


def finetune_slim(args, model: str, slim, teacher, splits, seed: int, folder: Path, key: dict) -> dict:
    """The shared fine-tune: structkit.finetune.finetune with FINETUNE settings, recalibration before and after."""
    from structkit.config import FinetuneConfig
    from structkit.data import make_loaders
    from structkit.finetune import finetune
    from structkit.training import evaluate, recalibrate_batchnorm

    bs = MODELS[model]["batch_size"]
    recal = recalibration_batches(splits, bs, seed)
    _, _, test_loader = make_loaders(splits, bs, seed=seed)
    recalibrate_batchnorm(slim, recal)
    acc_pruned = evaluate(slim, test_loader)["accuracy"]
    settings = FinetuneConfig(epochs=args.ft_epochs, **FINETUNE)
    train_loader, val_loader, _ = make_loaders(splits, bs, seed=seed + 7)  # the pipeline's fine-tune loader seed
    t0 = time.perf_counter()
    history = finetune(slim, train_loader, settings, checkpoints=folder / "checkpoints", key=key,
                       teacher=teacher if settings.distill else None, recalibration=recal, val_loader=val_loader,
                       log=lambda msg: None)
    seconds = time.perf_counter() - t0
    recalibrate_batchnorm(slim, recal)
    slim.eval()
    return {"acc": evaluate(slim, test_loader)["accuracy"], "acc_pruned": acc_pruned,
            "finetune_seconds": seconds, "finetune_history": history}


def export_pair(dense, slim, inputs, folder: Path) -> None:
    from structkit.deploy import export_onnx
    export_onnx(dense, inputs, folder / "dense.onnx")
    export_onnx(slim, inputs, folder / "slim.onnx")


def time_pair(folder: Path, images: np.ndarray, warmup: int, runs: int, threads: int = 2) -> dict:
    """Dense and slim ONNX files of one row timed at batch 64, interleaved in this process."""
    from structkit.deploy import measure_latency
    batch = 64
    feed = {"input": np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))}
    lat = measure_latency({"dense": folder / "dense.onnx", "slim": folder / "slim.onnx"}, lambda b: feed, [batch],
                          threads=threads, warmup=warmup, runs=runs)
    row = lat[str(batch)]
    return {"ort_ms_b64": row["slim_p50_ms"], "dense_ort_ms_b64": row["dense_p50_ms"], "speedup": row["speedup"],
            "ort_settings": row["settings"], "ort_protocol": lat["protocol"]}


def base_row(args, model: str, method: str, target: float, seed: int) -> dict:
    return {"model": model, "method": method, "target": float(target), "seed": int(seed), "epochs": args.epochs,
            "ft_epochs": args.ft_epochs, "limit_train": args.limit_train, "round_to": ROUND_TO,
            "global_pruning": not args.uniform, "date": now()}


def run_tp(args, model: str, seed: int, methods: list[str], targets: list[float], jpath: Path) -> None:
    """Every Torch-Pruning row (and the dense reference row) of (model, seed) not yet in the JSON."""
    from structkit.data import make_loaders
    from structkit.training import evaluate, recalibrate_batchnorm

    with locked(jpath) as data:
        todo = [(m, t) for m in methods for t in targets if find_row(data, model, m, t, seed) is None]
        need_dense_row = find_row(data, model, "dense", 1.0, seed) is None
    if not todo and not need_dense_row:
        return
    splits = load_splits(args, model)
    bs = MODELS[model]["batch_size"]
    example = splits.train.tensors[0][:1]
    inputs = splits.val.tensors[0][:64]
    images = splits.test.tensors[0][:64].numpy()
    _, _, test_loader = make_loaders(splits, bs, seed=seed)
    trained = {}

    def get_trained(kind: str):
        if kind not in trained:
            net, info = shared_training(args, model, seed, kind, splits)
            recalibrate_batchnorm(net, recalibration_batches(splits, bs, seed))
            net.eval()
            info["acc_trained"] = evaluate(net, test_loader)["accuracy"]
            trained[kind] = (net, info)
        return trained[kind]

    if need_dense_row:
        net, info = get_trained("dense")
        folder = Path(args.out) / model / f"s{seed}" / "dense"
        folder.mkdir(parents=True, exist_ok=True)
        from structkit.deploy import export_onnx
        export_onnx(net, inputs, folder / "dense.onnx")
        export_onnx(net, inputs, folder / "slim.onnx")  # the same model: speedup 1 by construction, timed anyway
        macs, params = macs_params(net, example)
        row = {**base_row(args, model, "dense", 1.0, seed), "ft_epochs": 0, "acc": info["acc_trained"],
               "acc_trained": info["acc_trained"], "macs": macs, "params": params, "macs_dense": macs,
               "params_dense": params, "macs_ratio": 1.0, "train_epoch_seconds": info["epoch_seconds"],
               "folder": str(folder), **time_pair(folder, images, args.warmup, args.runs), "timing": "inline"}
        put_row(jpath, row)
        print(f"[{model} dense s{seed}] acc {row['acc']:.4f} macs {macs/1e6:.2f}M", flush=True)
    grads = None
    for method, target in todo:
        t0 = time.perf_counter()
        net, info = get_trained("groupnorm" if method == "tp_groupnorm" else "dense")
        if method == "tp_taylor" and grads is None:
            grads = taylor_gradients(net, splits, bs, seed)
        slim, pinfo = tp_prune(args, model, net, method, target, example, grads)
        folder = Path(args.out) / model / f"s{seed}" / f"{method}_t{target:g}"
        key = {"method": method, "target": target, "seed": seed, "epochs": args.epochs, "ft": FINETUNE,
               "limit_train": args.limit_train, "uniform": args.uniform}
        ft = finetune_slim(args, model, slim, net, splits, seed, folder, key)
        export_pair(net, slim, inputs, folder)
        row = {**base_row(args, model, method, target, seed), **ft, "acc_trained": info["acc_trained"], **pinfo,
               "macs_ratio": pinfo["macs"] / pinfo["macs_dense"], "train_epoch_seconds": info["epoch_seconds"],
               "folder": str(folder), **time_pair(folder, images, args.warmup, args.runs), "timing": "inline",
               "wall_s": time.perf_counter() - t0}
        if method == "tp_groupnorm":
            row["groupnorm_reg"] = GROUPNORM_REG
        put_row(jpath, row)
        print(f"[{model} {method} 1/{target:g} s{seed}] acc {row['acc']:.4f} (pruned {row['acc_pruned']:.4f}, "
              f"trained {row['acc_trained']:.4f}) macs {row['macs_ratio']:.3f} params {row['params']:,} "
              f"widths {pinfo['widths']} speedup {row['speedup']:.2f} ({row['wall_s']:.0f}s)", flush=True)


# ------------------------------------------------------------------------------------------------ structkit rows

def solver_settings(model: str, solver: str) -> dict:
    """benchmarks/defaults.py's settings of ``solver``, with the model's own lr where it has one (``solver_lr``)."""
    lr = MODELS[model].get("solver_lr", {}).get(solver)
    return {**SOLVERS[solver], **({"lr": lr} if lr is not None else {})}


def structkit_config(args, model: str, method: str, target: float, seed: int) -> dict:
    """The config a user would write for this row (see the module docstring)."""
    spec = MODELS[model]
    solver, changes = SK_VARIANTS[method]
    config = {
        "model": copy.deepcopy(spec["model"]),
        "data": {"name": "fashion_mnist", "options": data_options(args, model)},
        "optimizer": {"name": solver, **solver_settings(model, solver), "milestones": [args.epochs - 1], "gamma": 0.1},
        "schedule": {"epochs": args.epochs, "batch_size": spec["batch_size"], "seed": seed, "threads": args.threads,
                     "bn_recalibration_batches": RECAL_BATCHES},
        "structure": [{"select": "*", "types": ["Conv2d"], "kind": "channels", "lam": START_LAM}],
        "prune": {"round_to": ROUND_TO},
        "compress": {"target": {"macs": 1.0 / target}},
        "finetune": {"epochs": args.ft_epochs, **FINETUNE},
        "deploy": {"batch_sizes": [64], "threads": 2, "warmup": args.warmup, "runs": args.runs},
    }
    for section, values in changes.items():
        config[section].update(values)
    return config


def run_structkit(args, model: str, seed: int, methods: list[str], targets: list[float], jpath: Path) -> None:
    from structkit.pipeline import Log, run
    with locked(jpath) as data:
        todo = [(m, t) for m in methods for t in targets if find_row(data, model, m, t, seed) is None]
    for method, target in todo:
        folder = Path(args.out) / model / f"s{seed}" / f"{method}_t{target:g}"
        cfg = structkit_config(args, model, method, target, seed)
        t0 = time.perf_counter()
        try:
            report = run(cfg, folder, resume=True, log=Log(quiet=True))
        except Exception as exc:
            print(f"[{model} {method} 1/{target:g} s{seed}] FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        row = structkit_row(args, model, method, target, seed, folder)
        put_row(jpath, row)
        print(f"[{model} {method} 1/{target:g} s{seed}] acc {row['acc']:.4f} (pruned {row['acc_pruned']}, trained "
              f"{row['acc_trained']:.4f}) macs {row['macs_ratio']:.3f} params {row['params']:,} speedup "
              f"{row['speedup'] or float('nan'):.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)


def structkit_row(args, model: str, method: str, target: float, seed: int, folder: Path) -> dict:
    """The JSON row of a finished structkit run, from its report.json and metrics.jsonl."""
    report = json.loads((folder / "report.json").read_text())
    lat = (report.get("latency") or {}).get("64") or {}
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    macs, macs0 = report["macs"]["after"], report["macs"]["before"]
    acc = report["accuracy"]
    return {**base_row(args, model, method, target, seed), "acc": acc["slim"], "acc_pruned": acc.get("slim_pruned"),
            "acc_projected": acc.get("projected"), "acc_trained": acc["trained"], "macs": macs,
            "params": report["params"]["after"], "macs_dense": macs0, "params_dense": report["params"]["before"],
            "macs_ratio": macs / macs0, "target_report": report.get("target"),
            "widths": {name: layer.get("after") if isinstance(layer, dict) else layer
                       for name, layer in (report.get("layers") or {}).items()},
            "sparsity": report.get("sparsity"), "finetune": report.get("finetune"),
            "train_epoch_seconds": [r.get("epoch_seconds") for r in history],
            "controller_final": (history[-1] if history else {}).get("target"),
            "val_accuracy_curve": [r.get("val_accuracy") for r in history],
            "ort_ms_b64": lat.get("slim_p50_ms"), "dense_ort_ms_b64": lat.get("dense_p50_ms"),
            "speedup": lat.get("speedup"), "ort_settings": lat.get("settings"),
            "ort_protocol": report.get("latency_protocol"), "timing": "inline (pipeline bench)",
            "folder": str(folder), "config": report.get("config"), "git": report.get("git"),
            "wall_s": report.get("wall_time_s")}


def refresh_structkit_rows(args, jpath: Path) -> None:
    """Rebuild every structkit row of the JSON from its run folder (keeps a --time re-timing)."""
    timing = ("ort_ms_b64", "dense_ort_ms_b64", "speedup", "ort_settings", "ort_protocol", "timing", "timed",
              "load_average")
    with locked(jpath) as data:
        for i, row in enumerate(data["rows"]):
            if row["method"] not in SK_METHODS or not (Path(row["folder"]) / "report.json").is_file():
                continue
            keep = {k: row[k] for k in timing if k in row} if row.get("timing") == "retimed" else {}
            args_row = argparse.Namespace(**{**vars(args), "epochs": row["epochs"], "ft_epochs": row["ft_epochs"],
                                             "limit_train": row["limit_train"], "uniform": not row["global_pruning"]})
            new = structkit_row(args_row, row["model"], row["method"], row["target"], row["seed"], Path(row["folder"]))
            data["rows"][i] = {**new, **keep, "date": row.get("date", new["date"])}


def structkit_ready() -> bool:
    """Whether structkit's config knows ``compress.target`` (the lead's CompressConfig)."""
    try:
        from structkit import config
    except ImportError:
        return False
    return hasattr(config, "CompressConfig")


# ------------------------------------------------------------------------------------------------ re-timing

def retime(args, jpath: Path) -> None:
    """Re-time the saved ONNX pair of every finished row (batch 64, interleaved, ``--runs`` rounds)."""
    with locked(jpath) as data:
        rows = [dict(r) for r in data["rows"] if r.get("folder")]
    images = {}
    for row in rows:
        if args.models and row["model"] not in args.models:
            continue
        folder = Path(row["folder"])
        if not (folder / "dense.onnx").is_file() or not (folder / "slim.onnx").is_file():
            print(f"skip {row_key(row)}: no ONNX pair in {folder}")
            continue
        if row["model"] not in images:
            images[row["model"]] = load_splits(args, row["model"]).test.tensors[0][:64].numpy()
        t = time_pair(folder, images[row["model"]], args.warmup, args.runs)
        t.update(timing="retimed", timed=now(), load_average=os.getloadavg())
        with locked(jpath) as data:
            for r in data["rows"]:
                if row_key(r) == row_key(row):
                    r.update(t)
        print(f"{row_key(row)}: slim {t['ort_ms_b64']:.2f} ms, dense {t['dense_ort_ms_b64']:.2f} ms, "
              f"speedup {t['speedup']:.2f}", flush=True)


# ------------------------------------------------------------------------------------------------ table and plot

def mean_std(values) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def grouped(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    order = {m: i for i, m in enumerate(("dense",) + METHODS)}
    for row in sorted(rows, key=lambda r: (r["model"], order.get(r["method"], 99), float(r["target"]))):
        groups.setdefault((row["model"], row["method"], float(row["target"])), []).append(row)
    return groups


def target_met(row: dict) -> bool:
    """Whether the row's MACs are within its target (dense MACs / target)."""
    return row["macs_ratio"] <= 1.0 / float(row["target"]) + 1e-9


def markdown_table(data: dict) -> str:
    def pm(m, s, fmt):
        return "-" if m is None else (fmt.format(m) + (f" ± {fmt.format(s)}" if s else ""))

    lines = ["| model | method | MACs target | seeds | test acc % | trained acc % | acc after pruning % | MACs ratio | "
             "target met | params | ORT speedup b64 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, method, target), rows in grouped(data["rows"]).items():
        acc = mean_std([r["acc"] * 100 for r in rows])
        pruned = mean_std([r["acc_pruned"] * 100 if r.get("acc_pruned") is not None else None for r in rows])
        trained = mean_std([r["acc_trained"] * 100 if r.get("acc_trained") is not None else None for r in rows])
        ratio = mean_std([r["macs_ratio"] for r in rows])
        params = mean_std([r["params"] for r in rows])
        speed = mean_std([r.get("speedup") for r in rows])
        tgt = "dense" if method == "dense" else f"1/{target:g}"
        met = "-" if method == "dense" else f"{sum(target_met(r) for r in rows)}/{len(rows)}"
        lines.append(f"| {model} | {method} | {tgt} | {len(rows)} | {pm(*acc, '{:.2f}')} | {pm(*trained, '{:.2f}')} | {pm(*pruned, '{:.2f}')} | "
                     f"{pm(*ratio, '{:.3f}')} | {met} | {pm(*params, '{:,.0f}')} | {pm(*speed, '{:.2f}')} |")
    return "\n".join(lines)


COLORS = {"ramda": "tab:red", "ramda_fixed": "tab:brown", "proxgen": "tab:green", "proxgen_fixed": "tab:olive",
          "tp_magnitude": "tab:orange", "tp_taylor": "tab:blue", "tp_groupnorm": "tab:purple", "dense": "black"}


def plot(data: dict, path: Path) -> None:
    """One column per model; top: accuracy vs ORT speedup (the figure the benchmark is for), bottom: accuracy vs
    MACs reduction (deterministic, free of the timing noise of a shared machine)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(r["model"] == m for r in data["rows"])] or ["none"]
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 8), squeeze=False)
    groups = grouped(data["rows"])
    axes_x = (("speedup", "ONNX Runtime speedup over dense, batch 64 (p50, 2 threads)"),
              ("macs_reduction", "MACs reduction (dense MACs / slim MACs)"))
    for col, model in enumerate(models):
        for ax, (field, xlabel) in zip(axes[:, col], axes_x):
            for method in ("dense",) + METHODS:
                pts = []
                for (m, meth, target), rows in groups.items():
                    if m != model or meth != method:
                        continue
                    xv = [r.get("speedup") if field == "speedup" else 1.0 / r["macs_ratio"] for r in rows]
                    x, xs = mean_std(xv)
                    y, ys = mean_std([r["acc"] * 100 for r in rows])
                    if x is not None:
                        pts.append((x, y, xs, ys, target, len(rows)))
                if not pts:
                    continue
                pts.sort()
                x, y, xs, ys, targets, n = zip(*pts)
                seeds = f"{min(n)}-{max(n)}" if min(n) != max(n) else f"{max(n)}"
                ax.errorbar(x, y, xerr=xs, yerr=ys, fmt="o-" if method != "dense" else "*", color=COLORS[method],
                            capsize=3, ms=5 if method != "dense" else 10,
                            label=f"{method} ({seeds} seed{'s' if max(n) > 1 else ''})")
                if method != "dense":
                    for xi, yi, t in zip(x, y, targets):
                        ax.annotate(f"1/{t:g}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=6,
                                    color=COLORS[method])
            meta = data.get("meta", {}).get(model, {})
            images = meta.get("limit_train", "?")
            images = "the full training set" if images == 0 else f"{images} training images"
            ax.set_title(f"{model}: {meta.get('epochs', '?')} train + {meta.get('ft_epochs', '?')} fine-tune "
                         f"epochs, {images}", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy % (after fine-tuning)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Equal-budget frontier on Fashion-MNIST\nmean over seeds, bars = std; labels = MACs target",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print("wrote", path)


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cnn"], choices=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0],
                   help="MACs targets as speedup factors: MACs <= dense MACs / target")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3, help="E_train: training epochs of every method")
    p.add_argument("--ft-epochs", type=int, default=1, help="E_ft: fine-tuning epochs of every method")
    p.add_argument("--limit-train", type=int, default=4000, help="training images (0: all left after validation)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="validation split: this fraction of the 60k "
                   "training images (the fine-tune evaluates it every epoch)")
    p.add_argument("--uniform", action="store_true", help="Torch-Pruning: one ratio per layer (global_pruning "
                                                          "False) instead of global pruning")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (1: one invocation per "
                   "model side by side on a busy 2-core machine)")
    p.add_argument("--warmup", type=int, default=5, help="ORT warm-up rounds (inline timing)")
    p.add_argument("--runs", type=int, default=20, help="ORT timed rounds (inline timing; --time: 100 unless set)")
    p.add_argument("--no-distill", action="store_true", help="fine-tune every method on the labels only (no "
                   "distillation from its trained model); use its own --json")
    p.add_argument("--out", default="runs/frontier")
    p.add_argument("--json", default="benchmarks/results/frontier.json")
    p.add_argument("--time", action="store_true", help="re-time every finished row's ONNX files, then exit")
    p.add_argument("--plot", action="store_true", help="write the plot (--png) of --json, then exit")
    p.add_argument("--png", default="benchmarks/results/frontier.png")
    p.add_argument("--table", action="store_true", help="print the markdown table of --json, then exit")
    p.add_argument("--refresh", action="store_true", help="rebuild the structkit rows of --json from their run "
                                                          "folders' report.json, then exit")
    p.add_argument("--quick", action="store_true", help="smoke version: 1000 images, 2 + 1 epochs, one target, seed "
                                                        "0, own JSON/out")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.quick:
        args.limit_train, args.epochs, args.ft_epochs, args.targets, args.seeds = 1000, 2, 1, [2.0], [0]
        args.out += "_quick"
        args.json = args.json.replace(".json", "_quick.json")
        args.png = args.png.replace(".png", "_quick.png")
    jpath = Path(args.json)
    if args.table:
        print(markdown_table(json.loads(jpath.read_text())))
        return 0
    if args.refresh:
        refresh_structkit_rows(args, jpath)
        return 0
    if args.plot:
        plot(json.loads(jpath.read_text()), Path(args.png))
        return 0
    if args.time:
        if "--runs" not in argv:
            args.runs, args.warmup = 100, 20
        torch.set_num_threads(args.threads)
        retime(args, jpath)
        return 0
    if args.epochs < 2 and any(m in SK_METHODS for m in args.methods):
        p.error("structkit rows need --epochs >= 2 (one restart stage at the last epoch)")
    torch.set_num_threads(args.threads)
    if args.no_distill:
        FINETUNE["distill"] = False
    with locked(jpath) as data:
        for model in args.models:
            data["meta"][model] = {
                "epochs": args.epochs, "ft_epochs": args.ft_epochs, "limit_train": args.limit_train,
                "batch_size": MODELS[model]["batch_size"], "finetune": FINETUNE, "round_to": ROUND_TO,
                "global_pruning": not args.uniform, "groupnorm_reg": GROUPNORM_REG,
                "taylor_batches": TAYLOR_BATCHES, "dense_optimizer": {"name": "adamw", **ADAMW},
                "solvers": {m: {**solver_settings(model, SK_VARIANTS[m][0]), "changes": SK_VARIANTS[m][1]}
                            for m in SK_METHODS},
                "start_lam": START_LAM,
                "data": {"name": "fashion_mnist", "options": data_options(args, model)},
                **{k: v for k, v in data["meta"].get(model, {}).items() if k in ("seeds_note", "epoch_timing")}}
            data["meta"].setdefault("commands", [])
            command = "python benchmarks/frontier.py " + " ".join(argv)
            if command not in data["meta"]["commands"]:
                data["meta"]["commands"].append(command)
    tp_methods = [m for m in args.methods if m in TP_METHODS]
    sk_methods = [m for m in args.methods if m in SK_METHODS]
    for model in args.models:
        for seed in args.seeds:
            if tp_methods:  # the dense reference row comes with them (a structkit-only invocation does not train it)
                run_tp(args, model, seed, tp_methods, args.targets, jpath)
    if sk_methods:
        if not structkit_ready():
            print("structkit has no compress.target section (structkit.config.CompressConfig) yet: structkit rows "
                  "skipped", flush=True)
            return 1
        for model in args.models:
            for seed in args.seeds:
                run_structkit(args, model, seed, sk_methods, args.targets, jpath)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
