"""Built-in data sets: registry, split correctness, normalisation, corrupt-file errors, reproducible loaders."""
from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from structkit.data import Splits, digits, fashion_mnist, get_dataset, list_datasets, make_loaders, register_dataset

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"]
needs_fashion = pytest.mark.skipif(
    not all((FASHION_ROOT / f).is_file() for f in FASHION_FILES),
    reason=f"Fashion-MNIST not installed in {FASHION_ROOT} (apt-get install dataset-fashion-mnist)")


def raw_pixels(splits: Splits, split: str, levels: float) -> np.ndarray:
    """Undo the normalisation: integer pixel values (0..levels) of one split, one row per image."""
    x = getattr(splits, split).tensors[0]
    mean = torch.tensor(splits.mean)[None, :, None, None]
    std = torch.tensor(splits.std)[None, :, None, None]
    values = ((x * std + mean) * levels).flatten(1)
    rounded = values.round()
    assert (values - rounded).abs().max().item() < 1e-3, "normalisation did not use the stored mean/std"
    return rounded.to(torch.uint8).numpy()


def row_counts(*arrays: np.ndarray) -> Counter:
    return Counter(row.tobytes() for a in arrays for row in a)


# --------------------------------------------------------------------------------------------------- registry

def test_builtin_datasets_are_registered():
    assert {"digits", "fashion_mnist"} <= set(list_datasets())


def test_unknown_dataset_names_the_closest_valid_one():
    with pytest.raises(ValueError, match=r"unknown data set 'digit'.*Did you mean 'digits'.*fashion_mnist"):
        get_dataset("digit")


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")(lambda: None)


# --------------------------------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digit_splits() -> Splits:
    return get_dataset("digits", seed=0)


def test_digits_shapes_types_and_sizes(digit_splits):
    s = digit_splits
    assert (s.input_shape, s.num_classes, s.name) == ((1, 8, 8), 10, "digits")
    assert (len(s.train), len(s.val), len(s.test)) == (1167, 270, 360)
    for split in (s.train, s.val, s.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))


def test_digits_train_split_is_standardised(digit_splits):
    x = digit_splits.train.tensors[0]
    assert abs(x.mean().item()) < 1e-5
    assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_digits_splits_partition_the_data_set(digit_splits):
    """Every image of load_digits lands in exactly one split (as a multiset: the set has duplicate images)."""
    from sklearn.datasets import load_digits
    original = load_digits().images.reshape(len(load_digits().images), -1).astype(np.uint8)
    splits = [raw_pixels(digit_splits, split, levels=16.0) for split in ("train", "val", "test")]
    assert row_counts(*splits) == row_counts(original)


def test_digits_splits_are_stratified(digit_splits):
    overall = np.bincount(np.concatenate([s.tensors[1].numpy() for s in
                                          (digit_splits.train, digit_splits.val, digit_splits.test)])) / 1797
    for split in (digit_splits.train, digit_splits.val, digit_splits.test):
        share = np.bincount(split.tensors[1].numpy(), minlength=10) / len(split)
        assert np.abs(share - overall).max() < 0.01


def test_digits_split_is_deterministic_for_a_seed(digit_splits):
    again, other = digits(seed=0), digits(seed=1)
    for split in ("train", "val", "test"):
        for a, b in zip(getattr(digit_splits, split).tensors, getattr(again, split).tensors):
            assert torch.equal(a, b)
    assert not torch.equal(digit_splits.test.tensors[1], other.test.tensors[1])


@pytest.mark.parametrize("options", [{"val_fraction": 0.0}, {"test_fraction": 1.0},
                                     {"val_fraction": 0.5, "test_fraction": 0.5}])
def test_digits_rejects_fractions_that_leave_no_split(options):
    with pytest.raises(ValueError, match="fraction"):
        digits(**options)


# --------------------------------------------------------------------------------------------------- Fashion-MNIST

@pytest.fixture(scope="module")
def fashion() -> Splits:
    return fashion_mnist(FASHION_ROOT)


def read_idx_labels(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read()[8:], dtype=np.uint8)


@needs_fashion
def test_fashion_mnist_sizes_shapes_and_labels(fashion):
    assert (fashion.input_shape, fashion.num_classes) == ((1, 28, 28), 10)
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (54000, 6000, 10000)
    for split in (fashion.train, fashion.val, fashion.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert y.dtype == torch.int64 and y.min().item() == 0 and y.max().item() == 9


@needs_fashion
def test_fashion_mnist_is_normalised_with_training_statistics(fashion):
    x = fashion.train.tensors[0]
    assert abs(x.mean().item()) < 1e-4 and x.std().item() == pytest.approx(1.0, abs=1e-4)
    assert fashion.mean[0] == pytest.approx(0.286, abs=1e-3) and fashion.std[0] == pytest.approx(0.353, abs=1e-3)
    raw_pixels(fashion, "test", levels=255.0)  # test inputs use the same mean/std


@needs_fashion
def test_fashion_mnist_test_split_is_the_official_one(fashion):
    labels = read_idx_labels(FASHION_ROOT / "t10k-labels-idx1-ubyte.gz")
    assert np.array_equal(fashion.test.tensors[1].numpy(), labels)


@needs_fashion
def test_fashion_mnist_validation_is_held_out_of_the_training_file(fashion):
    with gzip.open(FASHION_ROOT / "train-images-idx3-ubyte.gz") as f:
        original = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(60000, -1)
    train, val = raw_pixels(fashion, "train", 255.0), raw_pixels(fashion, "val", 255.0)
    assert row_counts(train, val) == row_counts(original)
    file_labels = read_idx_labels(FASHION_ROOT / "train-labels-idx1-ubyte.gz")
    assert not np.array_equal(fashion.train.tensors[1].numpy(), file_labels[:54000])  # random, not the tail


@needs_fashion
def test_fashion_mnist_limit_train_keeps_the_first_images_and_the_same_validation(fashion):
    small = fashion_mnist(FASHION_ROOT, limit_train=500)
    assert len(small.train) == 500
    assert torch.equal(small.train.tensors[1], fashion.train.tensors[1][:500])
    assert torch.equal(small.val.tensors[1], fashion.val.tensors[1])
    reseeded = fashion_mnist(FASHION_ROOT, limit_train=500, seed=1)
    assert not torch.equal(reseeded.val.tensors[1], fashion.val.tensors[1])


def test_fashion_mnist_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*download=True"):
        fashion_mnist(tmp_path / "nowhere")


def corrupt_copy(tmp_path: Path, name: str, content: bytes) -> Path:
    """A Fashion-MNIST folder in tmp_path: links to the real files, ``name`` replaced by ``content``."""
    for f in FASHION_FILES:
        (tmp_path / f).symlink_to(FASHION_ROOT / f)
    (tmp_path / name).unlink()
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


@needs_fashion
def test_truncated_gzip_file_gives_a_clear_error(tmp_path):
    name = "train-labels-idx1-ubyte.gz"
    whole = (FASHION_ROOT / name).read_bytes()
    path = corrupt_copy(tmp_path, name, whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"corrupt or truncated") as info:
        fashion_mnist(tmp_path)
    assert str(path) in str(info.value) and "apt-get install --reinstall dataset-fashion-mnist" in str(info.value)


@needs_fashion
def test_idx_file_with_missing_bytes_gives_a_clear_error(tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    with gzip.open(FASHION_ROOT / name) as f:
        content = f.read()
    path = corrupt_copy(tmp_path, name, gzip.compress(content[:-100]))
    with pytest.raises(ValueError, match=r"corrupt or truncated .*9908 bytes, the header \(10000,\) implies 10008") \
            as info:
        fashion_mnist(tmp_path)
    assert str(path) in str(info.value)


@needs_fashion
def test_idx_file_of_the_wrong_kind_gives_a_clear_error(tmp_path):
    labels = (FASHION_ROOT / "train-labels-idx1-ubyte.gz").read_bytes()
    corrupt_copy(tmp_path, "train-images-idx3-ubyte.gz", labels)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz is corrupt .*magic number 0x00000801"):
        fashion_mnist(tmp_path)


@needs_fashion
def test_fashion_mnist_finds_the_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FASHION_FILES:
        (raw / f).symlink_to(FASHION_ROOT / f)
    assert len(fashion_mnist(tmp_path, limit_train=10).test) == 10000


# --------------------------------------------------------------------------------------------------- loaders

def batch_labels(loader) -> list[torch.Tensor]:
    return [y for _, y in loader]


def test_train_loader_order_is_reproducible_for_a_seed(digit_splits):
    first = batch_labels(make_loaders(digit_splits, 64, seed=3)[0])
    second = batch_labels(make_loaders(digit_splits, 64, seed=3)[0])
    other = batch_labels(make_loaders(digit_splits, 64, seed=4)[0])
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and len(first) == len(second) == 19
    assert not torch.equal(torch.cat(first), torch.cat(other))
    assert not torch.equal(torch.cat(first), digit_splits.train.tensors[1])  # shuffled


def test_eval_loaders_keep_the_split_order(digit_splits):
    _, val, test = make_loaders(digit_splits, 64, eval_batch_size=100)
    assert [len(y) for y in batch_labels(val)] == [100, 100, 70]
    assert torch.equal(torch.cat(batch_labels(test)), digit_splits.test.tensors[1])


def test_a_sampler_takes_over_the_training_order(digit_splits):
    sampler = DistributedSampler(digit_splits.train, num_replicas=2, rank=1, shuffle=True, seed=0)
    train, _, _ = make_loaders(digit_splits, 64, sampler=sampler)
    labels = torch.cat(batch_labels(train))
    assert torch.equal(labels, digit_splits.train.tensors[1][list(sampler)])
    assert len(labels) == 584
