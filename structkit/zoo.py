"""Models by name from torchvision and timm, and the weights a model starts from (``model.init``).

:func:`structkit.models.get_model` resolves names; this module does the torchvision / timm part:

* a torchvision classification model name (``"resnet18"``, ``"mobilenet_v3_small"``; 3-channel inputs);
* ``"timm:<name>"``: ``timm.create_model(name, num_classes=..., in_chans=..., **options)``; any name of
  ``timm.list_models()``, with an optional weight tag (``"timm:resnet18.a1_in1k"``). Needs timm: the ``zoo`` extra,
  ``pip install 'structkit[zoo]'``.

``init`` (``model.init`` in a config):

* ``"random"``: the builder's own initialisation;
* ``"pretrained"``: torchvision's ``DEFAULT`` weights or timm's default pretrained weights, **read from the local
  cache only** -- structkit never downloads. torchvision looks in ``<torch hub dir>/checkpoints/`` (see
  :func:`torch.hub.get_dir`; ``$TORCH_HOME/hub``); timm in the Hugging Face cache (``$HF_HUB_CACHE``) and the torch
  hub folder. A missing file is a FileNotFoundError that names where to put it. When the data set has another number
  of classes than the weights, the classifier keeps its random initialisation (torchvision: a warning names the
  tensors; timm does the same itself);
* a path: a state dict (``torch.load(..., weights_only=True)``: tensors and plain data only), a dict holding one
  under ``"model"`` or ``"state_dict"`` (a structkit checkpoint, a training script's checkpoint), or a structkit run
  folder (its last ``checkpoints/epoch_NNNN.pt``). Keys and shapes must match the model exactly; otherwise a
  ValueError lists the first few missing, unexpected and mis-shaped tensors.
"""
from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import load_weights

__all__ = ["TIMM_PREFIX", "ZOO_EXTRA", "is_timm", "require_timm", "check_timm_name", "torchvision_names",
           "build_torchvision", "build_timm", "has_pretrained", "pretrained_file", "load_init", "load_state_dict_checked"]

TIMM_PREFIX = "timm:"
ZOO_EXTRA = "pip install 'structkit[zoo]' (the zoo extra; or pip install timm)"
#: timm.create_model keywords that structkit sets itself, and from what
TIMM_RESERVED = {"num_classes": "the data set", "in_chans": "the data set", "pretrained": "model.init",
                 "pretrained_cfg_overlay": "model.init", "checkpoint_path": "model.init"}
_SHOW = 5  # problems listed per kind in a mismatch error


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def require_timm():
    """The timm module, or an ImportError naming the extra that installs it."""
    try:
        import timm
    except ImportError as e:
        raise ImportError(f"model names 'timm:...' need timm, which is not installed: {ZOO_EXTRA}") from e
    return timm


def check_timm_name(name: str) -> str:
    """``name`` (``"timm:<arch>"``) if timm knows ``<arch>``, else a ValueError with the closest timm name."""
    arch = name[len(TIMM_PREFIX):]
    timm = require_timm()
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        hint = f" (did you mean 'timm:{close[0]}'?)" if close else ""
        raise ValueError(f"unknown timm model {arch!r}{hint}; timm.list_models() lists the names "
                         f"(e.g. 'timm:resnet18')")
    return name


def torchvision_names() -> list[str]:
    import torchvision.models
    return torchvision.models.list_models(module=torchvision.models)


def build_torchvision(name: str, input_shape: tuple, num_classes: int, options: dict[str, Any]) -> nn.Module:
    """torchvision classification model ``name`` with random weights (``init`` loads any weights afterwards)."""
    import torchvision.models
    if "weights" in options:
        raise ValueError(f"get_model({name!r}) takes no weights= option: structkit runs offline; use "
                         f"init='pretrained' (weights from the local cache) or init=<path of a state dict>.")
    if input_shape[:1] != (3,):
        raise ValueError(f"torchvision model {name!r} expects 3-channel images, got input_shape {input_shape}. Use a "
                         f"built-in model or a timm model (any channel count) for other inputs, or make the data "
                         f"3-channel.")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)


def build_timm(name: str, input_shape: tuple, num_classes: int, options: dict[str, Any],
               pretrained: bool = False) -> nn.Module:
    """``timm.create_model``; with ``pretrained`` the weights come from the local cache (:func:`pretrained_file`)
    through timm's own loader, which adapts the classifier and the first convolution to the data set."""
    timm = require_timm()
    check_timm_name(name)
    for key, source in TIMM_RESERVED.items():
        if key in options:
            raise ValueError(f"model {name!r}: option {key!r} is set by {source}; drop it")
    if len(input_shape) != 3:
        raise ValueError(f"timm model {name!r} needs image inputs (channels, height, width); got input_shape "
                         f"{input_shape}")
    kwargs = dict(num_classes=num_classes, in_chans=int(input_shape[0]), **options)
    arch = name[len(TIMM_PREFIX):]
    if not pretrained:
        return timm.create_model(arch, pretrained=False, **kwargs)
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file(name))},
                             **kwargs)


# --------------------------------------------------------------------------------------------------- pretrained

def has_pretrained(name: str) -> bool:
    """Whether ``name`` has pretrained weights that ``init='pretrained'`` could load (files are not checked)."""
    if is_timm(name):
        return _timm_cfg(name) is not None
    return name in torchvision_names() and _torchvision_weights(name) is not None


def _timm_cfg(name: str):
    from timm.models import get_pretrained_cfg
    check_timm_name(name)
    cfg = get_pretrained_cfg(name[len(TIMM_PREFIX):])
    return cfg if cfg is not None and (cfg.hf_hub_id or cfg.url) else None


def _torchvision_weights(name: str):
    import torchvision.models
    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError, KeyError):
        return None


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _url_file(url: str) -> str:
    return os.path.basename(url.split("?")[0])


def pretrained_file(name: str) -> Path:
    """The locally cached pretrained weight file of ``name`` (a torchvision name or ``timm:<arch>``).

    Raises ValueError when the model has no pretrained weights, FileNotFoundError (naming the places looked at and
    what to do) when they are not in the cache: nothing is downloaded."""
    candidates: list[Path] = []  # cached files, in the order they are tried
    looked: list[str] = []
    fixes: list[str] = []
    if is_timm(name):
        cfg = _timm_cfg(name)
        if cfg is None:
            raise ValueError(f"model.init: pretrained: timm has no pretrained weights for {name!r}; pick a tagged name "
                             f"from timm.list_models(pretrained=True) or give a path")
        if cfg.hf_hub_id:
            files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            candidates += _hf_cached(cfg.hf_hub_id, files)
            looked.append(f"{' or '.join(files)} of {cfg.hf_hub_id} in the Hugging Face cache ({_hf_cache_dir()})")
            fixes.append(f"fill the Hugging Face cache (`huggingface-cli download {cfg.hf_hub_id}` on a machine with "
                         f"network, then copy the cache folder here)")
        if cfg.url:
            candidates.append(_hub_checkpoints() / _url_file(cfg.url))
            looked.append(str(candidates[-1]))
            fixes.append(f"download {cfg.url} and put it at {candidates[-1]}")
    elif name in torchvision_names():
        weights = _torchvision_weights(name)
        if weights is None:
            raise ValueError(f"model.init: pretrained: torchvision has no pretrained weights for {name!r}; give a path")
        candidates.append(_hub_checkpoints() / _url_file(weights.url))
        looked.append(str(candidates[-1]))
        fixes.append(f"download {weights.url} and put it at {candidates[-1]} (the torch hub folder is $TORCH_HOME/hub)")
    else:
        raise ValueError(f"model.init: pretrained: {name!r} has no pretrained weights (only torchvision and timm models "
                         f"do); set model.init to the path of a state dict, or to random")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"model.init: pretrained: the weights of {name!r} are not in the local cache (looked for {'; '.join(looked)}) "
        f"and structkit never downloads: {'; or '.join(fixes)}; or set model.init to the path of a state dict.")


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants
    except ImportError:
        return "$HF_HUB_CACHE; huggingface_hub is not installed"
    return f"$HF_HUB_CACHE = {constants.HF_HUB_CACHE}"


def _hf_cached(repo_id: str, filenames: Sequence[str]) -> list[Path]:
    """The cached files among ``filenames`` of ``repo_id`` in the Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []
    found = []
    for filename in filenames:
        hit = try_to_load_from_cache(repo_id, filename)
        if isinstance(hit, str):
            found.append(Path(hit))
    return found


def load_torchvision_pretrained(model: nn.Module, name: str, num_classes: int) -> None:
    """torchvision's DEFAULT weights of ``name`` from the cache into ``model``; a classifier built for another
    number of classes keeps its random initialisation (with a warning)."""
    path = pretrained_file(name)
    state = _as_state_dict(load_weights(path, "pretrained weight file"), path)
    trained_classes = len(_torchvision_weights(name).meta.get("categories") or ())
    own = model.state_dict()
    head = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
            and v.shape[:1] == (trained_classes,) and own[k].shape[:1] == (num_classes,)
            and tuple(v.shape[1:]) == tuple(own[k].shape[1:])]
    for key in head:
        state[key] = own[key]
    load_state_dict_checked(model, state, f"{name} pretrained weights ({path})")
    if head:
        warnings.warn(f"model {name}: the pretrained classifier ({', '.join(head)}) is for {trained_classes} classes; "
                      f"it keeps its random initialisation for the data set's {num_classes}", stacklevel=2)


# --------------------------------------------------------------------------------------------------- a path

_CKPT_RE = re.compile(r"^epoch_(\d+)\.pt$")


def load_init(model: nn.Module, source: str | os.PathLike) -> Path:
    """Load the weights at ``source`` (state dict file, checkpoint dict, or structkit run folder) into ``model``;
    returns the file read."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = sorted((int(m.group(1)), p) for p in (path / "checkpoints").glob("epoch_*.pt")
                       if (m := _CKPT_RE.match(p.name)))
        if not found:
            raise FileNotFoundError(f"model.init: {path} is a folder but not a structkit run folder (no "
                                    f"checkpoints/epoch_NNNN.pt in it); give a state dict file or a run folder")
        path = found[-1][1]
    elif not path.exists():
        raise FileNotFoundError(f"model.init: {path} does not exist (a relative path is taken from the working "
                                f"directory, {Path.cwd()}); give random, pretrained, or the path of a state dict, a "
                                f"checkpoint or a structkit run folder")
    state = _as_state_dict(load_weights(path, "state dict"), path)
    load_state_dict_checked(model, state, str(path))
    return path


def _as_state_dict(data: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``data``: itself, or the one under ``"model"`` / ``"state_dict"``."""
    for _ in range(2):
        if isinstance(data, Mapping) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
            return dict(data)
        if isinstance(data, Mapping):
            inner = next((data[k] for k in ("model", "state_dict") if isinstance(data.get(k), Mapping)), None)
            if inner is not None:
                data = inner
                continue
        break
    what = (f"a dict with keys {', '.join(map(repr, list(data)[:8]))}" if isinstance(data, Mapping)
            else f"a {type(data).__name__}")
    raise ValueError(f"model.init: {path} holds {what}; expected a state dict (parameter name -> tensor, as "
                     f"model.state_dict() gives), or a dict holding one under 'model' or 'state_dict'")


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` when keys and shapes match exactly (a ``module.`` or ``_orig_mod.`` prefix
    from DDP / torch.compile is dropped); otherwise a ValueError listing the first few problems of each kind."""
    own = model.state_dict()
    state = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix):]: v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for label, items in (("missing from the file", missing), ("not in the model", unexpected),
                         ("of another shape", shapes)):
        if items:
            more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
            problems.append(f"{len(items)} tensor(s) {label}: {', '.join(items[:_SHOW])}{more}")
    if problems:
        raise ValueError(f"model.init: the weights in {source} do not fit the model: {'; '.join(problems)}. They must "
                         f"come from the same architecture, options and data set (input channels, classes).")
    model.load_state_dict(state)
