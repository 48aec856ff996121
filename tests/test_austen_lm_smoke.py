"""Smoke test of benchmarks/austen_lm.py --quick (one structured solver, no step timing): train, prune exactly,
export to ONNX, time, write the JSON and the plot."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

from structkit.text import AUSTEN_DB

pytestmark = pytest.mark.skipif(not AUSTEN_DB.with_suffix(".rdb").exists(),
                                reason="r-cran-janeaustenr is not installed")
pytest.importorskip("rdata")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "austen_lm.py"


def test_quick_run_prunes_exactly_and_writes_json_and_plot(tmp_path):
    spec = importlib.util.spec_from_file_location("austen_lm", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "lm.json"
    assert bench.main(["--quick", "--solvers", "proxgen", "--lams", "4e-4", "--no-timing", "--json", str(out),
                       "--plot", str(tmp_path / "lm.png"), "--onnx-dir", str(tmp_path / "onnx")]) == 0
    res = json.loads((tmp_path / "lm_quick.json").read_text())
    assert (tmp_path / "lm_quick.png").is_file()
    assert set(res["runs"]) == {"adamw", "proxgen_lam0.0004"}
    assert res["chosen"] == {"proxgen": "proxgen_lam0.0004"}
    for row in res["runs"].values():
        assert math.isfinite(row["val_ppl"]) and row["val_ppl"] < res["data"]["unigram_val_ppl"] * 1.5
        assert row["verify_max_abs_diff"] < 1e-4
        assert abs(row["slim_val_ppl_subset"] - row["curve"][-1]["val_ppl_subset"]) < 1e-4 * row["val_ppl"]
        assert len(row["heads_kept"]) == len(row["ffn_kept"]) == 2
        if row["params_after"] < row["params_before"]:
            assert row["speedup_b1"] > 0 and row["speedup_b8"] > 0
