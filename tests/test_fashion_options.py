"""fashion_mnist(size=..., channels=...): resized, channel-repeated images with the same labels and splits."""
from __future__ import annotations

import pytest
import torch

from structkit.data import fashion_mnist, get_dataset

from .test_data import needs_fashion


@needs_fashion
def test_size_and_channels_keep_splits_and_labels():
    plain = fashion_mnist(limit_train=200)
    big = fashion_mnist(limit_train=200, size=32, channels=3)
    assert plain.input_shape == (1, 28, 28)
    assert big.input_shape == (3, 32, 32)
    for split in ("train", "val", "test"):
        x0, y0 = getattr(plain, split).tensors
        x1, y1 = getattr(big, split).tensors
        assert x1.shape == (len(x0), 3, 32, 32)
        assert torch.equal(y0, y1)
        assert torch.equal(x1[:, 0], x1[:, 1]) and torch.equal(x1[:, 0], x1[:, 2])  # the grey channel, repeated
    assert big.mean[0] == big.mean[1] == big.mean[2]
    train = big.train.tensors[0]
    assert train.mean(dim=(0, 2, 3)).abs().max() < 1e-4  # normalised with the training split's statistics
    # resizing to 28 is the identity; channels alone repeats the original images
    same = fashion_mnist(limit_train=200, size=28, channels=2)
    assert torch.allclose(same.train.tensors[0][:, 1], plain.train.tensors[0][:, 0], atol=1e-6)
    assert get_dataset("fashion_mnist", limit_train=50, size=16).input_shape == (1, 16, 16)


@pytest.mark.parametrize("options, match", [({"size": 0}, "size must be"), ({"size": 32.0}, "size must be"),
                                            ({"size": True}, "size must be"), ({"channels": 0}, "channels must be"),
                                            ({"channels": "3"}, "channels must be")])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        fashion_mnist(**options)
