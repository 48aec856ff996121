"""benchmarks/frontier.py's pieces on a tiny budget (no training): Torch-Pruning reaches a MACs target with widths in
multiples of 16, rows are replaced by key in the locked JSON, and the table and the plot render."""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_pruning")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "frontier.py"


@pytest.fixture(scope="module")
def frontier():
    spec = importlib.util.spec_from_file_location("frontier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tp_prune_reaches_the_macs_target(frontier):  # Taylor: the path that needs gradients (~10 s loaded)
    from structkit.models import get_model
    torch.manual_seed(0)
    net = get_model("cnn", input_shape=(1, 28, 28), num_classes=10, widths=[32, 32, 64, 64, 128],
                    pool_after=[2, 4]).eval()
    example = torch.randn(1, 1, 28, 28)
    grads = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    slim, info = frontier.tp_prune(argparse.Namespace(uniform=False), "cnn", net, "tp_taylor", 2.0, example, grads)
    assert info["macs"] <= info["macs_dense"] / 2
    assert info["macs"] > info["macs_dense"] / 4  # the bisection stops near the target, not far below it
    assert all(w % 16 == 0 for w in info["widths"])
    assert slim(example).shape == (1, 10)
    assert [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)] == [32, 32, 64, 64, 128]


def test_rows_table_and_plot(frontier, tmp_path):
    pytest.importorskip("matplotlib")
    jpath = tmp_path / "f.json"
    for method, target, seed, acc in [("dense", 1.0, 0, 0.9), ("ramda", 2.0, 0, 0.5), ("ramda", 2.0, 1, 0.7),
                                      ("tp_taylor", 2.0, 0, 0.8), ("ramda", 2.0, 1, 0.6)]:
        frontier.put_row(jpath, {"model": "cnn", "method": method, "target": target, "seed": seed, "acc": acc,
                                 "acc_pruned": None, "macs_ratio": 1 / target, "params": 100, "speedup": target})
    data = json.loads(jpath.read_text())
    assert len(data["rows"]) == 4  # the second ramda seed-1 row replaced the first
    table = frontier.markdown_table(data)
    assert "| cnn | ramda | 1/2 | 2 | 55.00 ± 7.07 | - | - | 0.500 | 2/2 |" in table
    frontier.plot(data, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
