"""What a data set is to the pipeline: :class:`Splits` (train/val/test map-style Datasets plus the input shape and
the number of classes), :func:`as_splits`, the contract a ``"package.module:callable"`` data set's result is read
with, and :func:`collate`, the DataLoaders' batch maker. :mod:`structkit.data` loads data sets by name."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset, default_collate

__all__ = ["Splits", "as_splits", "collate", "check_fraction"]


@dataclass(frozen=True)
class Splits:
    """A loaded data set: train, validation and test splits, each a map-style ``Dataset`` whose items are
    ``(input, label)`` pairs (input a tensor of shape ``input_shape``, label an integer class index).

    ``mean`` and ``std`` are the per-channel statistics (of pixel intensities scaled to [0, 1]) that the
    inputs were normalised with, when known; a deployed model needs them to preprocess raw images the same way.
    ``classes`` names the classes when the data set knows them (``image_folder``: the folder names).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple
    num_classes: int
    name: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = ()


_PARTS = ("train", "val", "test")
_EXTRAS = ("num_classes", "input_shape", "mean", "std", "classes")


def as_splits(result: Any, *, name: str, val_fraction: float = 0.1, test_fraction: float = 0.1,
              seed: int = 0) -> Splits:
    """The contract of a ``"package.module:callable"`` data set: turn what it returned into :class:`Splits`.

    It may return

    * a :class:`Splits` (used as is);
    * one map-style ``Dataset`` (the training set);
    * a tuple ``(train,)``, ``(train, val)`` or ``(train, val, test)`` of Datasets;
    * a dict with ``"train"`` and optionally ``"val"``, ``"test"``, ``"num_classes"``, ``"input_shape"``,
      ``"mean"``, ``"std"``, ``"classes"``.

    Each Dataset has ``__len__`` and ``__getitem__`` (an ``IterableDataset`` cannot be used: the pipeline draws
    fixed subsets for BatchNorm recalibration and verification) and its items are ``(input, label)`` pairs: a tensor
    (or array) of one fixed shape and an integer class index. A missing val/test split is carved out of train: a
    seeded random ``val_fraction`` / ``test_fraction`` of it (so those examples get train's transforms; return your
    own val/test for random augmentation). ``input_shape`` defaults to the shape of ``train[0]``'s input;
    ``num_classes`` to ``len(train.classes)`` or ``max(train.targets) + 1`` (torchvision data sets have them), or
    the largest label + 1 of a ``TensorDataset``; otherwise return it in the dict.
    """
    if isinstance(result, Splits):
        return result
    where = f"data set {name!r}"
    if isinstance(result, Mapping):
        unknown = [k for k in result if k not in _PARTS + _EXTRAS]
        if unknown or "train" not in result:
            raise ValueError(f"{where} returned a dict with keys {list(result)}; it needs 'train' (a Dataset) and may "
                             f"have {', '.join(repr(k) for k in _PARTS[1:] + _EXTRAS)}")
        parts = dict(result)
    elif isinstance(result, (tuple, list)):
        if not 1 <= len(result) <= 3:
            raise ValueError(f"{where} returned a {type(result).__name__} of {len(result)} items; expected (train,), "
                             f"(train, val) or (train, val, test) Datasets")
        parts = dict(zip(_PARTS, result))
    else:
        parts = {"train": result}
    for key in _PARTS:
        if parts.get(key) is not None:
            _check_map_style(parts[key], f"{where}: {key}")
    train = parts["train"]
    if len(train) == 0:
        raise ValueError(f"{where}: the training set is empty")
    first = _first_example(train, where)
    missing = [k for k in ("val", "test") if parts.get(k) is None]
    if missing:
        fractions = {"val": val_fraction, "test": test_fraction}
        for key in missing:
            check_fraction(f"data.split.{key}_fraction", fractions[key])
        order = np.random.default_rng(seed).permutation(len(train))
        start = 0
        for key in missing:
            n = int(round(fractions[key] * len(train)))
            if n < 1 or start + n >= len(train):
                raise ValueError(f"{where}: a {key} split of {fractions[key]} of {len(train)} training examples "
                                 f"leaves {'no ' + key + ' examples' if n < 1 else 'no training examples'}; change "
                                 f"data.split or return a {key} set")
            parts[key] = Subset(train, np.sort(order[start:start + n]).tolist())
            start += n
        parts["train"] = Subset(train, np.sort(order[start:]).tolist())
    input_shape = tuple(int(d) for d in parts.get("input_shape") or tuple(torch.as_tensor(first[0]).shape))
    num_classes = parts.get("num_classes") or _num_classes(train, where)
    return Splits(train=parts["train"], val=parts["val"], test=parts["test"], input_shape=input_shape,
                  num_classes=int(num_classes), name=name, mean=tuple(parts.get("mean") or ()),
                  std=tuple(parts.get("std") or ()), classes=tuple(parts.get("classes") or ()))


def _check_map_style(dataset: Any, what: str) -> None:
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(f"{what} is a {type(dataset).__name__}; a map-style Dataset (with __len__ and __getitem__) is "
                        f"needed: the pipeline draws fixed subsets of it for BatchNorm recalibration and verification")


def _first_example(dataset: Dataset, where: str) -> tuple:
    item = dataset[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise TypeError(f"{where}: examples must be (input, label) pairs; train[0] is a {type(item).__name__}"
                        + (f" of {len(item)} items" if isinstance(item, (tuple, list)) else ""))
    x, y = item
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{where}: an example's input must be a tensor (or numpy array); train[0][0] is a "
                        f"{type(x).__name__} (a PIL image? add a ToTensor transform)")
    if not (isinstance(y, (int, np.integer)) or (isinstance(y, torch.Tensor) and y.numel() == 1
                                                  and not y.is_floating_point())):
        raise TypeError(f"{where}: an example's label must be an integer class index; train[0][1] is {y!r}")
    return item


def _num_classes(dataset: Dataset, where: str) -> int:
    """``len(classes)``, ``max(targets) + 1`` or a TensorDataset's largest label + 1 (looking through Subsets)."""
    while True:
        if getattr(dataset, "classes", None) is not None:
            return len(dataset.classes)
        if getattr(dataset, "targets", None) is not None:
            return int(torch.as_tensor(dataset.targets).max()) + 1
        if isinstance(dataset, TensorDataset):
            return int(dataset.tensors[-1].max()) + 1
        if not isinstance(dataset, Subset):
            break
        dataset = dataset.dataset
    raise ValueError(f"{where}: cannot tell the number of classes (the training set has no .classes or .targets); "
                     f"return a dict with 'num_classes'")


def check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a fraction strictly between 0 and 1; got {value}.")


def collate(batch: list) -> Any:
    """``default_collate``, with an error that says what to do when examples differ in shape."""
    try:
        return default_collate(batch)
    except RuntimeError as err:
        if "equal size" not in str(err) and "same size" not in str(err):
            raise
        shapes = sorted({tuple(torch.as_tensor(item[0]).shape) for item in batch})
        raise RuntimeError(f"the examples of one batch have different input shapes ({', '.join(map(str, shapes[:4]))}"
                           f"); a batch needs one shape: for image_folder add a resize: [h, w] or a center_crop "
                           f"transform, for your own data set make its inputs one size") from err
