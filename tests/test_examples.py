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


@pytest.mark.slow
@pytest.mark.transformers
def test_hf_trainer_example_ends_with_exact_zeros_a_smaller_verified_model_and_a_safe_reload(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and the machine may be shared
    try:
        result = load("hf_trainer").main(out=str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert result["zero_groups"] > 0
    assert sum(result["heads"]) < 16 and sum(result["ffn"]) < 256  # whole heads and FFN neurons removed
    assert result["params_after"] < result["params_before"]
    assert result["verify_rel_diff"] <= 1e-5
    assert result["reload_diff"] == 0.0
    assert result["accuracy"] >= 0.85
    assert (tmp_path / "slim.pt").is_file()
