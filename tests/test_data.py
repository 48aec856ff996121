"""Built-in data sets: registry, split correctness, normalisation, corrupt-file errors, reproducible loaders."""
from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

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


# --------------------------------------------------------------------------------------------------- image_folder

def make_image_folder(root: Path, classes=("cat", "dog"), n: int = 12, size=(16, 16), mode: str = "RGB",
                      seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: class k's images are noise around brightness 60 + 120 k (so they can be learnt)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = size if isinstance(size, tuple) else size[i % len(size)]
            pixels = np.clip(rng.normal(60 + 120 * k, 30, (h, w, channels)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "train")


AUGMENT = [{"random_crop": {"size": 12, "padding": 2}}, {"horizontal_flip": True},
           {"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}]


def test_image_folder_holds_out_stratified_seeded_splits(image_root):
    splits = get_dataset("image_folder", root=str(image_root), transforms=AUGMENT)
    assert splits.classes == ("cat", "dog") and splits.num_classes == 2 and splits.input_shape == (3, 12, 12)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 2, 2)  # 10% of 12 per class, each
    assert splits.mean == (0.5, 0.5, 0.5) and splits.std == (0.25, 0.25, 0.25)
    assert sorted(int(splits.val[i][1]) for i in range(2)) == [0, 1]
    files = {split: {getattr(splits, split).dataset.samples[i][0] for i in getattr(splits, split).indices}
             for split in ("train", "val", "test")}
    assert not (files["train"] & files["val"] or files["train"] & files["test"] or files["val"] & files["test"])
    again = get_dataset("image_folder", root=str(image_root), transforms=AUGMENT)
    assert again.val.indices == splits.val.indices
    other = get_dataset("image_folder", root=str(image_root), seed=1, transforms=AUGMENT)
    assert other.val.indices != splits.val.indices or other.test.indices != splits.test.indices
    assert len(get_dataset("image_folder", root=str(image_root), limit_train=5).train) == 5


def test_image_folder_augments_training_only(image_root):
    splits = get_dataset("image_folder", root=str(image_root), transforms=AUGMENT)
    torch.manual_seed(0)
    train_views = [splits.train[0][0] for _ in range(6)]
    assert any(not torch.equal(train_views[0], v) for v in train_views[1:]), "random crop/flip in training"
    assert torch.equal(splits.val[0][0], splits.val[0][0]) and torch.equal(splits.test[1][0], splits.test[1][0])
    x = splits.val[0][0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and x.min() < 0 < x.max()  # normalised


def test_image_folder_grayscale_resize_and_folders_for_val_and_test(tmp_path):
    train = make_image_folder(tmp_path / "train", classes=("a", "b", "c"), n=4, size=(20, 24), mode="L")
    val = make_image_folder(tmp_path / "val", classes=("b", "c"), n=2, size=(20, 24), mode="L", seed=1)
    test = make_image_folder(tmp_path / "test", classes=("a",), n=3, size=(30, 30), mode="L", seed=2)
    splits = get_dataset("image_folder", root=str(train), val=str(val), test=str(test),
                         transforms=[{"grayscale": 1}, {"resize": [10, 10]},
                                     {"normalize": {"mean": [0.5], "std": [0.5]}}])
    assert splits.input_shape == (1, 10, 10) and splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 3)  # folders: nothing held out of train
    # class indices follow the training folder, whatever classes a val/test folder lacks
    assert sorted({int(y) for _, y in splits.val}) == [1, 2] and {int(y) for _, y in splits.test} == {0}
    make_image_folder(tmp_path / "val" / ".." / "odd", classes=("zebra",), n=1)
    with pytest.raises(ValueError, match="class folders that the training folder lacks: \\['zebra'\\]"):
        get_dataset("image_folder", root=str(train), val=str(tmp_path / "odd"))


@pytest.mark.parametrize("options, message", [
    ({"transforms": [{"rezise": 8}]}, r"transforms\.0: unknown transform 'rezise' \(did you mean 'resize'\?\)"),
    ({"transforms": [{"resize": 8, "center_crop": 4}]}, "a mapping with one key"),
    ({"transforms": [{"resize": 0}]}, r"transforms\.0\.resize: input should be greater than or equal to 1"),
    ({"transforms": [{"random_crop": {"size": 8, "pad": 1}}]}, r"random_crop\.pad: unknown option.*'padding'"),
    ({"transforms": [{"horizontal_flip": 2}]}, r"horizontal_flip: input should be less than or equal to 1"),
    ({"transforms": [{"grayscale": 2}]}, r"grayscale: input should be 1 or 3"),
    ({"transforms": [{"normalize": {"mean": [0.5], "std": [0.5]}}, {"resize": 8}]}, "normalize must be the last"),
    ({"transforms": [{"normalize": {"mean": [0.5, 0.5], "std": [0.5, 0.5]}}]}, "2 mean/std values for 3-channel"),
    ({"transforms": [{"normalize": {"mean": [0.5], "std": [0]}}]}, r"normalize\.std\.0: input should be greater than 0"),
    ({"val": "/x", "val_fraction": 0.2}, "either val .* or val_fraction"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "must leave training images"),
    ({"roots": "/x"}, r"data\.options\.roots: unknown option \(did you mean 'root'\?\)"),
])
def test_image_folder_options_are_validated_with_clear_errors(image_root, options, message):
    with pytest.raises(ValueError, match=message):
        get_dataset("image_folder", **{"root": str(image_root), **options})


def test_image_folder_missing_or_flat_folders_say_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.options\.root: .* is not a folder; image_folder reads "
                                                r"<folder>/<class>/<image>"):
        get_dataset("image_folder", root=str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
        get_dataset("image_folder", root=str(tmp_path / "flat"))


def test_images_of_different_sizes_need_a_resize_or_crop(tmp_path):
    root = make_image_folder(tmp_path / "mixed", n=4, size=[(16, 16), (20, 16)])
    splits = get_dataset("image_folder", root=str(root), val_fraction=0.25, test_fraction=0.25)
    with pytest.raises(RuntimeError, match="different input shapes .* add a resize: \\[h, w\\] or a center_crop"):
        list(make_loaders(splits, 4)[0])
    fixed = get_dataset("image_folder", root=str(root), val_fraction=0.25, test_fraction=0.25,
                        transforms=[{"center_crop": 16}])
    assert {x.shape for x, _ in make_loaders(fixed, 4)[0]} == {(4, 3, 16, 16)}


def test_worker_processes_give_the_same_batches(image_root):
    splits = get_dataset("image_folder", root=str(image_root), transforms=[{"center_crop": 12}])
    plain = [(x, y) for x, y in make_loaders(splits, 8, seed=5)[0]]
    workers = [(x, y) for x, y in make_loaders(splits, 8, seed=5, num_workers=2)[0]]
    assert len(plain) == len(workers) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, workers))


def test_image_folder_config_runs_end_to_end(image_root, tmp_path):
    """`structkit run` on a folder of PNGs: train (2 epochs, the second the final stage), prune, export, bench."""
    import json

    import yaml

    from structkit.cli import main
    config = {
        "model": {"name": "cnn", "options": {"widths": [8, 8], "pool_after": [1]}},
        "data": {"name": "image_folder", "num_workers": 1, "options": {"root": str(image_root), "transforms": AUGMENT}},
        "optimizer": {"name": "ramda", "lr": 0.01, "momentum": 0.1, "milestones": [1]},
        "schedule": {"epochs": 2, "batch_size": 4, "eval_batch_size": 8, "bn_recalibration_batches": 2, "threads": 1},
        "structure": [{"select": "features.*", "types": ["Conv2d"], "kind": "channels", "lam": 1e-3}],
        "prune": {"verify_examples": 4},
        "deploy": {"batch_sizes": [1, 4], "warmup": 2, "runs": 5},
    }
    (tmp_path / "folder.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "folder.yaml"), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    for name in ("checkpoints/epoch_0002.pt", "slim.pt", "dense.onnx", "slim.onnx", "report.json", "report.md"):
        assert (out / name).is_file(), name
    assert report["config"]["data"]["name"] == "image_folder" and report["config"]["data"]["num_workers"] == 1
    assert 0.0 <= report["accuracy"]["trained"] <= 1.0 and 0.0 <= report["accuracy"]["slim"] <= 1.0
    assert report["verify"]["max_abs_diff_torch"] <= 1e-4 and report["verify"]["max_abs_diff_onnx"] <= 1e-4
    assert set(report["latency"]) == {"1", "4"}


# --------------------------------------------------------------------------------------------------- your own data

def blobs(n: int = 90, classes: int = 3, seed: int = 0) -> TensorDataset:
    """A ``package.module:callable`` data set: one TensorDataset of (1, 4, 4) inputs, ``classes`` Gaussian blobs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return TensorDataset(torch.randn(n, 1, 4, 4, generator=g) + y[:, None, None, None].float(), y)


def blob_parts(kind: str):
    train, val, test = blobs(60), blobs(15, seed=1), blobs(15, seed=2)
    return {"tuple2": (train, val), "tuple3": (train, val, test), "list1": [train],
            "dict": {"train": train, "test": test, "num_classes": 5, "classes": list("abcde")}}[kind]


class Plain(torch.utils.data.Dataset):
    """A map-style Dataset with neither .classes nor .targets."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.zeros(2), i % 2


class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(2), 0)])


def odd_items(kind: str):
    return {"dict_item": Items([{"x": torch.zeros(2), "y": 0}] * 5), "pil": Items([(object(), 0)] * 5),
            "float_label": Items([(torch.zeros(2), 0.5)] * 5), "plain": Plain(), "stream": Stream(),
            "bad_dict": {"training": blobs()}, "too_many": (blobs(),) * 4, "number": 3}[kind]


def test_a_callable_returning_one_dataset_gets_seeded_val_and_test_splits():
    splits = get_dataset("tests.test_data:blobs", n=100)
    assert splits.name == "tests.test_data:blobs" and splits.input_shape == (1, 4, 4) and splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 10, 10)
    seen = sorted(splits.train.indices + splits.val.indices + splits.test.indices)
    assert seen == list(range(100))
    from structkit.data import load_dataset
    other = load_dataset("tests.test_data:blobs", {"n": 100}, val_fraction=0.2, test_fraction=0.3, seed=4)
    assert (len(other.train), len(other.val), len(other.test)) == (50, 20, 30)
    assert other.val.indices != splits.val.indices


@pytest.mark.parametrize("kind, sizes, num_classes", [("tuple2", (54, 15, 6), 3), ("tuple3", (60, 15, 15), 3),
                                                      ("list1", (48, 6, 6), 3), ("dict", (54, 6, 15), 5)])
def test_a_callable_may_return_a_tuple_or_dict_of_datasets(kind, sizes, num_classes):
    splits = get_dataset("tests.test_data:blob_parts", kind=kind)
    assert (len(splits.train), len(splits.val), len(splits.test)) == sizes
    assert splits.num_classes == num_classes
    assert splits.classes == (tuple("abcde") if kind == "dict" else ())


def test_a_callable_returning_splits_is_used_as_is(digit_splits):
    from structkit.data import as_splits
    assert as_splits(digit_splits, name="x") is digit_splits


@pytest.mark.parametrize("kind, error, message", [
    ("dict_item", TypeError, r"examples must be \(input, label\) pairs; train\[0\] is a dict"),
    ("pil", TypeError, "input must be a tensor .* add a ToTensor transform"),
    ("float_label", TypeError, "label must be an integer class index"),
    ("plain", ValueError, "cannot tell the number of classes .* return a dict with 'num_classes'"),
    ("stream", TypeError, "map-style Dataset"),
    ("bad_dict", ValueError, "it needs 'train'"),
    ("too_many", ValueError, "tuple of 4 items"),
    ("number", TypeError, "train is a int; a map-style Dataset"),
])
def test_callable_results_outside_the_contract_say_what_is_wrong(kind, error, message):
    with pytest.raises(error, match=message):
        get_dataset("tests.test_data:odd_items", kind=kind)


def test_callable_dataset_builds_and_trains_in_the_pipeline(tmp_path):
    from structkit import pipeline
    from structkit.config import validate
    from structkit.training import evaluate, train_epoch
    config = validate({"model": {"name": "mlp", "options": {"widths": [16]}},
                       "data": {"name": "tests.test_data:blobs", "options": {"n": 120}, "split": {"seed": 3}},
                       "optimizer": {"name": "adamw", "lr": 0.01}, "schedule": {"epochs": 1, "batch_size": 16},
                       "structure": [{"select": "features.*", "types": ["Linear"], "kind": "channels", "lam": 0.0}]})
    setup = pipeline.build(config)
    assert setup.example_inputs.shape == (8, 1, 4, 4) and setup.verify_inputs.shape == (12, 1, 4, 4)
    train, val, _ = make_loaders(setup.splits, 16)
    solver, _ = pipeline.make_solver(config, setup.groupset)
    for epoch in range(1, 4):
        train_epoch(setup.model, train, solver, epoch=epoch)
    assert evaluate(setup.model, val)["accuracy"] > 0.5
