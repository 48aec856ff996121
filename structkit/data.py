"""Data sets by name, as train/val/test splits that any part of the pipeline can read through a DataLoader.

Every loader returns a :class:`Splits`: three map-style ``Dataset``\\ s of ``(input tensor, integer label)``
examples, plus the input shape and the number of classes that a model builder needs. Configs name a data set by

* a registered name (``list_datasets()``; register more with ``@register_dataset``):

  - ``fashion_mnist`` and ``digits`` are small and held in memory as ``TensorDataset``\\ s of float32 inputs,
    normalised with the per-channel mean and std of the *training* split (nothing leaks from validation or test);
  - ``image_folder`` reads images from folders one ``<root>/<class>/<image>`` at a time, with transforms from the
    config (:mod:`structkit.image_folder`);

* ``"package.module:callable"``: your own function, called with ``data.options``; what it may return is the
  contract of :func:`as_splits` (a Dataset, a tuple or dict of train/val/test Datasets, or a :class:`Splits`).

::

    splits = load_dataset("digits", {"seed": 0})
    splits = load_dataset("my_project.data:build", {"root": "/data/x"}, val_fraction=0.1, test_fraction=0.1)
    train_loader, val_loader, test_loader = make_loaders(splits, batch_size=128, seed=0, num_workers=2)

Nothing here downloads at run time unless asked to (``fashion_mnist(download=True)``): the build and test
machines have no network; ``docs/configuration.md`` says where the local copies live.
"""
from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from . import image_folder as _image_folder
from ._imports import import_callable
from .registry import Registry
from .splits import Splits, check_fraction, as_splits, collate

__all__ = ["Splits", "register_dataset", "get_dataset", "list_datasets", "dataset_loader", "load_dataset",
           "as_splits", "fashion_mnist", "digits", "image_folder", "make_loaders", "collate"]


_DATASETS: Registry[Callable[..., Splits]] = Registry(
    "data set", how="or 'package.module:callable' for your own (register more with @structkit.data.register_dataset)")


def register_dataset(name: str, *, replace: bool = False) -> Callable[[Callable[..., Splits]], Callable[..., Splits]]:
    """Decorator: make ``fn(**options) -> Splits`` available as ``get_dataset(name, **options)`` (a taken name is
    refused unless ``replace``)."""
    return _DATASETS.register(name, replace=replace)


def list_datasets() -> list[str]:
    """Names accepted by :func:`get_dataset`, sorted."""
    return _DATASETS.names()


def get_dataset(name: str, **options) -> Splits:
    """Load data set ``name`` (registered, or ``"package.module:callable"``); ``options`` go to its loader."""
    return load_dataset(name, options)


def dataset_loader(name: str) -> Callable[..., Any]:
    """The function behind ``name``: the registered loader, or the imported ``"package.module:callable"``.
    Raises ValueError (unknown name, import failure) or TypeError (not callable) with a message that says why."""
    if name in _DATASETS:
        return _DATASETS.get(name)
    if ":" in name:
        return import_callable(name, "data set")
    raise ValueError(_DATASETS.unknown(name))


def load_dataset(name: str, options: Mapping[str, Any] | None = None, *, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, seed: int = 0) -> Splits:
    """Load data set ``name`` with ``options``. For a ``"package.module:callable"``, its result goes through
    :func:`as_splits`; ``val_fraction``, ``test_fraction`` and ``seed`` carve the splits it does not return out of
    its training set (registered loaders take their own split options)."""
    loader = dataset_loader(name)
    result = loader(**dict(options or {}))
    if name in _DATASETS:
        return result if isinstance(result, Splits) else as_splits(result, name=name)
    return as_splits(result, name=name, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)


def _normalised_splits(name: str, images: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                       num_classes: int) -> Splits:
    """Build :class:`Splits` from ``[0, 1]``-scaled images of shape (N, C, H, W), normalised per channel
    with the training split's mean and std."""
    train = images["train"]
    mean = train.mean(axis=(0, 2, 3), dtype=np.float64)
    std = train.std(axis=(0, 2, 3), dtype=np.float64)
    shift = mean.astype(np.float32)[None, :, None, None]
    scale = np.maximum(std, 1e-12).astype(np.float32)[None, :, None, None]

    def dataset(split: str) -> TensorDataset:
        x = torch.from_numpy(((images[split] - shift) / scale).astype(np.float32, copy=False))
        y = torch.from_numpy(labels[split].astype(np.int64))
        return TensorDataset(x, y)

    return Splits(train=dataset("train"), val=dataset("val"), test=dataset("test"),
                  input_shape=tuple(train.shape[1:]), num_classes=num_classes, name=name,
                  mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


# --------------------------------------------------------------------------------------------------- Fashion-MNIST

_FASHION_FILES = {  # (split, what) -> file name; the same names in the Debian package and torchvision's raw/
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes, 3 and 1 dimensions


def _read_idx(path: Path, what: str, fix: str) -> np.ndarray:
    """Read a gzip-compressed IDX file (big-endian header: magic, then one int32 size per dimension, then
    unsigned bytes) and check that it is complete; corrupt files raise ``ValueError`` naming ``path``."""
    def corrupt(problem: str) -> ValueError:
        return ValueError(f"{path} is corrupt or truncated ({problem}). {fix}")

    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise corrupt(f"gzip: {e}") from e
    ndim = 3 if what == "images" else 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise corrupt(f"{len(raw)} bytes, shorter than the {header}-byte IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[what]:
        raise corrupt(f"magic number 0x{magic:08x}, expected 0x{_IDX_MAGIC[what]:08x} for IDX {what}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise corrupt(f"{len(raw)} bytes, the header {shape} implies {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_fashion_files(root: Path) -> dict[tuple[str, str], Path] | None:
    """The four IDX files under ``root`` (Debian layout) or ``root/FashionMNIST/raw`` (torchvision layout)."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        paths = {key: folder / name for key, name in _FASHION_FILES.items()}
        if all(p.is_file() for p in paths.values()):
            return paths
    return None


@register_dataset("fashion_mnist")
def fashion_mnist(root: str | Path = "/usr/share/datasets/fashion-mnist", val_fraction: float = 0.1,
                  seed: int = 0, limit_train: int | None = None, download: bool = False, size: int | None = None,
                  channels: int = 1) -> Splits:
    """Fashion-MNIST: 28x28 grey images of 10 kinds of clothing; input shape (1, 28, 28).

    ``size=n`` resizes every image to n x n by bilinear interpolation (``torch.nn.functional.interpolate``,
    ``align_corners=False``, antialiased when shrinking) before normalisation, e.g. ``size: 32`` for models built
    for CIFAR-sized inputs; ``None`` (default) or 28 keeps the originals. ``channels=3`` repeats the grey channel
    (for torchvision models, which expect RGB); the per-channel mean and std are then equal. The input shape
    becomes ``(channels, size, size)``.

    The official 10k test split is kept as is; the validation split is ``val_fraction`` of the 60k training
    images, chosen by a permutation seeded with ``seed`` (both splits keep the file order, so
    ``limit_train=n`` keeps the first ``n`` training images for quick runs and leaves validation unchanged).

    The IDX files are read directly from ``root`` -- by default the Debian package ``dataset-fashion-mnist`` --
    or from ``root/FashionMNIST/raw`` where torchvision puts them. ``download=True`` fetches them with
    torchvision's downloader into ``root`` when they are missing (needs a network).
    """
    check_fraction("val_fraction", val_fraction)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 4 <= size <= 1024):
        raise ValueError(f"size must be an integer between 4 and 1024 (the side of the resized square images, e.g. "
                         f"32), or None for the original 28x28; got {size!r}.")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive integer (1: grey, 3: the grey channel repeated for RGB "
                         f"models); got {channels!r}.")
    root = Path(root)
    paths = _find_fashion_files(root)
    if paths is None and download:
        from torchvision.datasets import FashionMNIST
        FashionMNIST(str(root), train=True, download=True)  # downloads all four files, keeps the .gz copies
        paths = _find_fashion_files(root)
    if paths is None:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files ({', '.join(_FASHION_FILES.values())}) not found in {root} or "
            f"{root / 'FashionMNIST' / 'raw'}. On Debian/Ubuntu run `apt-get install dataset-fashion-mnist` "
            f"(installs them in /usr/share/datasets/fashion-mnist), or pass download=True to fetch them with "
            f"torchvision into {root} (needs a network).")
    fix = (f"Reinstall it (`apt-get install --reinstall dataset-fashion-mnist`), or delete it and call "
           f"fashion_mnist(root={str(root)!r}, download=True) to fetch a fresh copy.")
    arrays = {key: _read_idx(path, key[1], fix) for key, path in paths.items()}
    for split in ("train", "test"):
        n_images, n_labels = len(arrays[split, "images"]), len(arrays[split, "labels"])
        if n_images != n_labels:
            raise ValueError(f"{paths[split, 'images']} holds {n_images} images but {paths[split, 'labels']} "
                             f"{n_labels} labels; the files come from different releases. {fix}")

    n = len(arrays["train", "labels"])
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if limit_train is not None:
        if not 1 <= limit_train <= len(train_idx):
            raise ValueError(f"limit_train must be between 1 and {len(train_idx)} (the training images left "
                             f"after holding out validation); got {limit_train}.")
        train_idx = train_idx[:limit_train]

    def scaled(split: str, idx: np.ndarray | None = None) -> np.ndarray:
        x = arrays[split, "images"] if idx is None else arrays[split, "images"][idx]
        x = (x.astype(np.float32) / 255.0)[:, None, :, :]
        if size is not None and size != x.shape[-1]:
            x = torch.nn.functional.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear",
                                                align_corners=False, antialias=size < x.shape[-1]).numpy()
        return np.repeat(x, channels, axis=1) if channels > 1 else x

    images = {"train": scaled("train", train_idx), "val": scaled("train", val_idx), "test": scaled("test")}
    labels = {"train": arrays["train", "labels"][train_idx], "val": arrays["train", "labels"][val_idx],
              "test": arrays["test", "labels"]}
    return _normalised_splits("fashion_mnist", images, labels, num_classes=10)


# --------------------------------------------------------------------------------------------------- 8x8 digits

@register_dataset("digits")
def digits(val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """scikit-learn's 1,797 8x8 handwritten digits (no files needed); input shape (1, 8, 8).

    Train, validation and test splits are stratified by class and seeded; the fractions are of the whole set.
    This is the zero-setup data set for tests and examples.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must leave training data; got "
                         f"{val_fraction} + {test_fraction} >= 1.")
    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None, :, :]  # pixel values are 0..16
    y = data.target
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                                      random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest,
                                                      test_size=val_fraction / (1.0 - test_fraction),
                                                      stratify=y_rest, random_state=seed)
    return _normalised_splits("digits", {"train": x_train, "val": x_val, "test": x_test},
                              {"train": y_train, "val": y_val, "test": y_test}, num_classes=10)


# --------------------------------------------------------------------------------------------------- loaders

@register_dataset("image_folder")
def image_folder(**options) -> Splits:
    """Images in ``<root>/<class>/<image>`` folders, read one at a time, with transforms from the config; the
    options are those of :class:`structkit.image_folder.ImageFolderOptions`."""
    return as_splits(_image_folder.load(**options), name="image_folder")


image_folder.check_options = _image_folder.check_options  # the config validates data.options with it


def make_loaders(splits: Splits, batch_size: int, *, seed: int = 0, eval_batch_size: int = 1024,
                 sampler: Sampler | None = None, pin_memory: bool = False,
                 num_workers: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    """DataLoaders ``(train, val, test)`` over ``splits``.

    The training loader shuffles with a ``torch.Generator`` seeded with ``seed``, so the batch order of a run
    is reproducible (with or without workers); pass ``sampler`` (e.g. a ``DistributedSampler``, which has its own
    seed and ``set_epoch``) to take over the order instead. Validation and test loaders keep the split's order.
    ``num_workers``: worker processes that read and transform examples (``data.num_workers``; 0 = in this process,
    right for in-memory tensors, where workers would only add start-up cost). Random transforms draw from each
    worker's generator, which torch seeds from the loader's, so a run stays reproducible for a given
    ``num_workers``. ``pin_memory``: page-locked batches, for a run on a GPU (the copies to it then do not block
    the host).
    """
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate)
    train = DataLoader(splits.train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                       generator=generator, **common)
    val = DataLoader(splits.val, batch_size=eval_batch_size, shuffle=False, **common)
    test = DataLoader(splits.test, batch_size=eval_batch_size, shuffle=False, **common)
    return train, val, test
