"""The examples under examples/ run, and end as they claim: exactly-zero groups, a smaller verified model."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_plain_loop_example_ends_with_exact_zeros_and_a_smaller_verified_model():
    result = load("plain_loop").main()
    assert result["zero_groups"] > 0
    assert result["params_after"] < result["params_before"]
    assert result["verify_rel_diff"] <= 1e-5
    assert result["accuracy"] >= 0.85
