"""Interleaved step timing: several optimizers on the same batches in one process, so a shared machine's
drifting load hits them alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def round_robin_step_times(setups: dict, batches: Sequence, loss: Callable, rounds: int) -> dict[str, list[float]]:
    """Seconds per training step of each ``name: (model, optimizer)`` in ``setups``: ``rounds`` recorded rounds
    (after one warm-up round), each running every optimizer over all ``batches`` (``(x, y)`` pairs), with the
    order reversed every other round. ``loss(output, y)`` is the training loss."""
    names = list(setups)
    times = {n: [] for n in names}
    for r in range(rounds + 1):  # round 0: warm-up, not recorded
        for name in (names if r % 2 == 0 else names[::-1]):
            model, opt = setups[name]
            model.train()
            t0 = time.perf_counter()
            for x, y in batches:
                opt.zero_grad(set_to_none=True)
                loss(model(x), y).backward()
                opt.step()
            if r:
                times[name].append((time.perf_counter() - t0) / len(batches))
    return times


def median_ratios(times: dict[str, list[float]], reference: str = "adamw") -> dict:
    """Median step time per optimizer (ms) and its ratio to ``reference``'s."""
    ms = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    return {"step_ms_median": ms, "ratio_to_adamw": {n: ms[n] / ms[reference] for n in ms}}
