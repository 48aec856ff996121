"""The ``image_folder`` data set: images in ``<root>/<class>/<image>`` folders (torchvision's ``ImageFolder``),
read one at a time through the DataLoader, with transforms declared in the config.

::

    data:
      name: image_folder
      num_workers: 2
      options:
        root: /data/flowers/train         # one sub-folder per class
        val: /data/flowers/val            # optional; else val_fraction of root (stratified, seeded)
        test_fraction: 0.1                # or test: /data/flowers/test
        transforms:
          - resize: 72                    # shorter side to 72 (or [h, w])
          - random_crop: {size: 64, padding: 4}
          - horizontal_flip: 0.5
          - normalize: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}

Transforms run in the order given, on PIL images, then the image becomes a float tensor in [0, 1] (``ToTensor``)
and ``normalize`` (always last) applies. The random ones only act on the training split: validation and test use
``center_crop`` for ``random_crop`` and no flip, so their inputs are deterministic and of the same shape.
Images are read as RGB (3 channels) unless ``grayscale: 1``.

:func:`load` validates its options with :class:`ImageFolderOptions` (the config does the same before training) and
returns the dict of :func:`structkit.data.as_splits`; nothing is loaded beyond the one example that gives the input
shape.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

__all__ = ["ImageFolderOptions", "Transform", "RandomCrop", "Normalize", "check_options", "load", "build_transforms"]

Side = Annotated[int, Field(ge=1)]
Size = Side | tuple[Side, Side]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RandomCrop(_Strict):
    """``random_crop: {size: 28, padding: 2}`` (``random_crop: 28`` = no padding)."""

    size: Size
    padding: Annotated[int, Field(ge=0)] = 0


class Normalize(_Strict):
    """``normalize: {mean: [...], std: [...]}``: one value per channel (or one for all), of [0, 1] intensities."""

    mean: list[float] = Field(min_length=1)
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_length(self) -> Normalize:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std {len(self.std)}")
        return self


class Transform(_Strict):
    """One transform: a mapping with exactly one of these keys."""

    resize: Size | None = Field(None, description="shorter side to this size (an int), or exactly [h, w]")
    center_crop: Size | None = Field(None, description="the central size or [h, w] patch")
    random_crop: Annotated[Annotated[Size, Tag("crop-size")] | Annotated[RandomCrop, Tag("crop-options")],
                           Discriminator(lambda v: "crop-options" if isinstance(v, (dict, RandomCrop)) else "crop-size")] | None = \
        Field(None, description="a random patch in training (center crop in evaluation); optional zero padding")
    horizontal_flip: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="flip left-right with this probability in training (true = 0.5)")
    grayscale: Literal[1, 3] | None = Field(None, description="convert to grey with 1 or 3 channels (true = 1)")
    normalize: Normalize | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, data: Any) -> Any:
        names = list(cls.model_fields)
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(f"a transform is a mapping with one key ({', '.join(names)}), e.g. {{resize: 32}}; "
                             f"got {data!r}")
        (key, value), = data.items()
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown transform {key!r}{hint}; accepted: {', '.join(names)}")
        if value is True and key in ("horizontal_flip", "grayscale"):
            value = 0.5 if key == "horizontal_flip" else 1
        if value is None or value is False:
            raise ValueError(f"transform {key!r} needs a value (e.g. {{{key}: ...}}); got {value!r}")
        return {key: value}

    def op(self) -> tuple[str, Any]:
        return next((k, v) for k, v in self if v is not None)


class ImageFolderOptions(_Strict):
    """``data.options`` of ``image_folder``."""

    root: str = Field(description="the training folder: one sub-folder of images per class")
    val: str | None = Field(None, description="validation folder (same class names); else val_fraction of root")
    test: str | None = Field(None, description="test folder (same class names); else test_fraction of root")
    val_fraction: Fraction | None = Field(None, description="fraction of root held out for validation "
                                                            "(default 0.1 when there is no val folder)")
    test_fraction: Fraction | None = Field(None, description="fraction of root held out for testing "
                                                             "(default 0.1 when there is no test folder)")
    seed: Annotated[int, Field(ge=0)] = Field(0, description="seed of the held-out images (stratified by class)")
    limit_train: Annotated[int, Field(ge=1)] | None = Field(None, description="keep the first n training images")
    transforms: list[Transform] = Field(default_factory=list, description="applied in order (see the module doc)")

    @model_validator(mode="after")
    def _consistent(self) -> ImageFolderOptions:
        for split in ("val", "test"):
            if getattr(self, split) is not None and getattr(self, f"{split}_fraction") is not None:
                raise ValueError(f"give either {split} (a folder) or {split}_fraction, not both")
        if self.held_out("val") + self.held_out("test") >= 1:
            raise ValueError(f"val_fraction + test_fraction must leave training images; got "
                             f"{self.held_out('val')} + {self.held_out('test')}")
        ops = [t.op()[0] for t in self.transforms]
        if "normalize" in ops and ops.index("normalize") != len(ops) - 1:
            raise ValueError("transforms: normalize must be the last transform (it acts on the tensor)")
        norm = self.normalize()
        if norm is not None and len(norm.mean) not in (1, self.channels()):
            raise ValueError(f"transforms: normalize has {len(norm.mean)} mean/std values for {self.channels()}-channel "
                             f"images; give {self.channels()}" + (" (or 1)" if self.channels() > 1 else ""))
        return self

    def held_out(self, split: str) -> float:
        """The fraction of root held out for ``split`` (0 when it has its own folder)."""
        if getattr(self, split) is not None:
            return 0.0
        value = getattr(self, f"{split}_fraction")
        return 0.1 if value is None else value

    def channels(self) -> int:
        grey = [t.grayscale for t in self.transforms if t.grayscale is not None]
        return grey[-1] if grey else 3

    def normalize(self) -> Normalize | None:
        return next((t.normalize for t in self.transforms if t.normalize is not None), None)


def options_error(err: ValidationError, prefix: str = "data.options") -> str:
    """pydantic's errors as ``field: message`` parts joined by ``; `` (the alternatives of a union joined by
    ``or``)."""
    by_field: dict[str, list[str]] = {}
    for e in err.errors():
        # union members and validators add parts like 'constrained-int', 'tuple[...]', 'RandomCrop': not fields
        loc = [p for p in e["loc"] if isinstance(p, int) or not (set(str(p)) & set("-[") or str(p)[:1].isupper())]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            owner = {1: ImageFolderOptions}.get(len(loc)) or {"random_crop": RandomCrop, "normalize": Normalize}.get(
                str(loc[-2]) if len(loc) > 1 else "")
            accepted = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), accepted, n=1)
            msg = f"unknown option{f' (did you mean {close[0]!r}?)' if close else ''}" + (
                f"; accepted: {', '.join(accepted)}" if accepted else "")
        elif e["type"] == "missing":
            msg = "required"
        elif e["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg[0].lower()}{msg[1:]} (got {e.get('input')!r})"
        by_field.setdefault(".".join(str(p) for p in (prefix, *loc)), []).append(msg)
    return "; ".join(f"{field}: {' or '.join(dict.fromkeys(msgs))}" for field, msgs in by_field.items())


def check_options(options: dict[str, Any]) -> ImageFolderOptions:
    """``options`` validated (nothing is read from disk); a ValueError lists every problem."""
    try:
        return ImageFolderOptions.model_validate(options)
    except ValidationError as err:
        raise ValueError(options_error(err)) from None


def build_transforms(steps: list[Transform], train: bool):
    """The torchvision pipeline of ``steps``: the training one, or the deterministic evaluation one."""
    from torchvision import transforms as T

    ops: list[Any] = []
    for step in steps:
        key, value = step.op()
        if key == "resize":
            ops.append(T.Resize(value))
        elif key == "center_crop":
            ops.append(T.CenterCrop(value))
        elif key == "random_crop":
            crop = value if isinstance(value, RandomCrop) else RandomCrop(size=value)
            ops.append(T.RandomCrop(crop.size, padding=crop.padding) if train else T.CenterCrop(crop.size))
        elif key == "horizontal_flip":
            if train:
                ops.append(T.RandomHorizontalFlip(value))
        elif key == "grayscale":
            ops.append(T.Grayscale(value))
        elif key == "normalize":
            ops += [T.ToTensor(), T.Normalize(value.mean, value.std)]
    if not any(step.normalize is not None for step in steps):
        ops.append(T.ToTensor())
    return T.Compose(ops)


def _folder_class():
    from torchvision.datasets import ImageFolder

    class Folder(ImageFolder):
        """ImageFolder whose class indices can be fixed (those of the training folder)."""

        def __init__(self, root: str, transform, class_to_idx: dict[str, int] | None = None):
            self.fixed = class_to_idx
            super().__init__(root, transform=transform, allow_empty=class_to_idx is not None)

        def find_classes(self, directory):
            classes, mapping = super().find_classes(directory)
            if self.fixed is None:
                return classes, mapping
            extra = [c for c in classes if c not in self.fixed]
            if extra:
                raise ValueError(f"{directory} has class folders that the training folder lacks: {extra[:5]}; "
                                 f"the training folder's classes are {sorted(self.fixed)[:10]}")
            return sorted(self.fixed, key=self.fixed.get), dict(self.fixed)

    Folder.__module__, Folder.__qualname__ = __name__, "Folder"
    return Folder


def __getattr__(name: str) -> Any:
    """``Folder`` is made on first use (torchvision is imported then, not with this module) and kept as a module
    attribute, so DataLoader workers can pickle it by name."""
    if name == "Folder":
        globals()["Folder"] = _folder_class()
        return globals()["Folder"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _open(root: str, what: str, transform, class_to_idx: dict[str, int] | None = None):
    folder_class = globals().get("Folder") or __getattr__("Folder")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.options.{what}: {path} is not a folder; image_folder reads "
                                f"<folder>/<class>/<image> (e.g. {path}/cat/0001.png)")
    try:
        return folder_class(str(path), transform, class_to_idx)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.options.{what}: {err}. image_folder reads <folder>/<class>/<image> (one "
                                f"sub-folder per class, images with extensions like .png, .jpg)") from None


def load(**options: Any) -> dict[str, Any]:
    """Open the folders and return ``{"train", "val", "test", "num_classes", "input_shape", "classes", "mean",
    "std"}`` (see :func:`structkit.data.as_splits`)."""
    from torch.utils.data import Subset

    opts = check_options(options)
    train_tf, eval_tf = build_transforms(opts.transforms, True), build_transforms(opts.transforms, False)
    train_all = _open(opts.root, "root", train_tf)
    eval_all = copy.copy(train_all)  # the same file list, evaluation transforms
    eval_all.transform = eval_tf
    eval_all.transforms = type(train_all.transforms)(eval_tf, None)

    targets = np.asarray(train_all.targets)
    rng = np.random.default_rng(opts.seed)
    held: dict[str, list[int]] = {"val": [], "test": []}
    for c in range(len(train_all.classes)):
        idx = rng.permutation(np.flatnonzero(targets == c))
        start = 0
        for split in ("val", "test"):
            n = int(round(opts.held_out(split) * len(idx)))
            held[split] += idx[start:start + n].tolist()
            start += n
    taken = set(held["val"]) | set(held["test"])
    train_idx = [i for i in range(len(targets)) if i not in taken]
    if opts.limit_train is not None:
        train_idx = train_idx[:opts.limit_train]
    if not train_idx:
        raise ValueError(f"data.options: no training images are left in {opts.root} after holding out validation "
                         f"and test images; lower val_fraction / test_fraction or give val / test folders")

    splits = {"train": Subset(train_all, train_idx)}
    for split in ("val", "test"):
        folder = getattr(opts, split)
        if folder is not None:
            splits[split] = _open(folder, split, eval_tf, train_all.class_to_idx)
        else:
            if not held[split]:
                raise ValueError(f"data.options: {split}_fraction {opts.held_out(split)} of {len(targets)} images in "
                                 f"{opts.root} gives no {split} images; raise it or give a {split} folder")
            splits[split] = Subset(eval_all, sorted(held[split]))
        if len(splits[split]) == 0:
            raise ValueError(f"data.options.{split}: {folder} holds no images")
    shape = tuple(eval_all[train_idx[0]][0].shape)
    norm = opts.normalize()
    return {**splits, "num_classes": len(train_all.classes), "input_shape": shape, "classes": train_all.classes,
            "mean": tuple(norm.mean) if norm else (), "std": tuple(norm.std) if norm else ()}
