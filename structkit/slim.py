"""Slim models on disk: the architecture as data, the weights as tensors. Loading never unpickles code.

A slim model differs from the dense model it was pruned from in three ways: layer widths (and with them the
shapes of parameters and buffers), a few replaced modules (``nn.MultiheadAttention`` with heads removed becomes
:class:`~structkit.structure.modules.PrunedMultiheadAttention`, a low-rank layer two thin layers in an
``nn.Sequential``, a binary layer :class:`~structkit.structure.modules.BinaryLinear` / ``BinaryConv2d``), and
per-layer attributes the dense constructor does not know (a Hugging Face BERT keeps its per-layer head counts on
its attention modules; its config still says the dense count). :func:`save_slim` therefore writes, with
``torch.save``, only tensors and plain data (loadable with ``torch.load(weights_only=True)``)::

    format        "structkit.slim"; version 2
    source        how to build the dense model, as data (or null: the caller passes ``build=``):
                    {"kind": "structkit", "name", "options", "input_shape", "num_classes"}  (structkit.models)
                    {"kind": "transformers", "class", "config", "attn_implementation"}    (Hugging Face)
    modules       every module, parents first: {name: {"class": "module:QualName", "attrs": {...}}}; attrs are
                  the module's public attributes of plain types (ints, floats, strings, bools, None, lists and
                  tuples of them): widths, head counts, kernel sizes, kept-head indices, train/eval flag
    architecture  :func:`architecture` of the model: class and widths per layer (checked after loading)
    state_dict    the weights (CPU tensors)

:func:`load_slim` builds the dense model (``build()`` or the recorded source), replaces the modules whose class
differs from the record by fresh instances of the classes above (an allowlist: a file cannot name any other
class), sets the recorded attributes, resizes parameters and buffers to the saved shapes and dtypes, loads the
state dict strictly, and checks the result: the recorded widths, and every known layer's weights against its
widths. Any failure -- a truncated or tampered file, pickled objects in it, a model that does not rebuild into
the recorded architecture -- is a ``ValueError`` naming the file and the problem.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import load_weights, save_torch
from .structure._util import set_submodule
from .structure.modules import BinaryConv2d, BinaryLinear, PrunedMultiheadAttention

__all__ = ["save_slim", "load_slim", "architecture", "structkit_source", "FORMAT", "VERSION"]

FORMAT = "structkit.slim"
VERSION = 2
_WIDTH_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "groups", "num_features", "embed_dim",
                "num_heads", "head_dim", "num_attention_heads", "attention_head_size", "all_head_size")
_SCALARS = (bool, int, float, str, type(None))


def architecture(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module with a width: its class and integer width/head-count attributes (``out_features``,
    ``num_heads``, BERT's ``num_attention_heads`` ...). Saved with a slim model and checked on load."""
    arch = {}
    for name, m in model.named_modules():
        widths = {a: getattr(m, a) for a in _WIDTH_ATTRS if isinstance(getattr(m, a, None), int)}
        if widths:
            arch[name] = {"class": type(m).__name__, **widths}
    return arch


def structkit_source(name: str, options: dict[str, Any], input_shape, num_classes: int) -> dict[str, Any]:
    """The ``source`` record of a model built by ``structkit.models.get_model(name, input_shape=...,
    num_classes=..., **options)`` (what ``structkit compress`` saves)."""
    return {"kind": "structkit", "name": str(name), "options": _plain_data(dict(options), "model options"),
            "input_shape": [int(s) for s in input_shape], "num_classes": int(num_classes)}


# ------------------------------------------------------------------------------------------------ saving

def save_slim(model: nn.Module, path: str | Path, *, source: dict[str, Any] | None = None) -> None:
    """Write ``model`` (a slim model from :func:`structkit.prune`, or any model) to ``path`` atomically, as data
    (see the module docstring). ``source`` says how to build the dense model (:func:`structkit_source`); a
    Hugging Face model records its class and config by itself; otherwise :func:`load_slim` needs ``build=``."""
    import structkit

    if source is None:
        source = _transformers_source(model)
    modules = {name: {"class": _class_key(m), "attrs": _attrs(m)} for name, m in model.named_modules()}
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    save_torch(path, {"format": FORMAT, "version": VERSION, "source": _plain_data(source, "source"),
                      "modules": modules, "architecture": architecture(model), "state_dict": state,
                      "versions": {"torch": str(torch.__version__), "structkit": str(structkit.__version__)}})


def _class_key(m: nn.Module) -> str:
    return f"{type(m).__module__}:{type(m).__qualname__}"


def _plain(value: Any) -> bool:
    if type(value) in _SCALARS:  # exact types: a str or int subclass (an enum, torch's version) is pickled as a class
        return True
    return type(value) in (list, tuple) and all(_plain(v) for v in value)


def _attrs(m: nn.Module) -> dict[str, Any]:
    """The module's public instance attributes of plain types (tuples kept as tuples)."""
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and _plain(v)}


def _plain_data(data: Any, what: str) -> Any:
    """``data`` if it is JSON-like (dicts with string/int keys, lists, tuples, scalars), else a TypeError."""
    if type(data) is dict:
        if not all(type(k) in (str, int) for k in data):
            raise TypeError(f"{what}: keys must be strings or ints")
        return {k: _plain_data(v, what) for k, v in data.items()}
    if type(data) in (list, tuple):
        return type(data)(_plain_data(v, what) for v in data)
    if type(data) in _SCALARS:
        return data
    raise TypeError(f"{what}: {type(data).__name__} is not plain data (numbers, strings, lists, dicts)")


def _transformers_source(model: nn.Module) -> dict[str, Any] | None:
    """The class name and config of a Hugging Face model that transformers exports under that name."""
    if not type(model).__module__.startswith("transformers.") or not hasattr(model, "config"):
        return None
    import transformers
    if getattr(transformers, type(model).__name__, None) is not type(model):
        return None
    return {"kind": "transformers", "class": type(model).__name__,
            "config": json.loads(model.config.to_json_string(use_diff=False)),
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


# ------------------------------------------------------------------------------------------------ loading

def load_slim(path: str | Path, map_location: Any = "cpu", *, build: Callable[[], nn.Module] | None = None
              ) -> nn.Module:
    """Rebuild the model saved by :func:`save_slim` at ``path`` (see the module docstring).

    ``build``: a function returning the dense (unpruned) model the slim model was pruned from, e.g.
    ``build=lambda: MyNet()`` -- needed when the file records no source (a model that is neither a structkit
    model saved by ``structkit compress`` nor a Hugging Face model), and used instead of the source when given.
    Its weights do not matter (they are replaced). The file is read with ``torch.load(weights_only=True)``: it
    never runs code. Raises ValueError naming the file when it is truncated, tampered, not a slim model, or does
    not fit the rebuilt architecture."""
    path = Path(path)
    saved = load_weights(path, "structkit slim model")
    if not (isinstance(saved, dict) and saved.get("format") == FORMAT):
        raise ValueError(f"{path} was not written by structkit.save_slim (no 'format': '{FORMAT}' record).")
    if saved.get("version") != VERSION or not all(k in saved for k in ("modules", "state_dict", "architecture")):
        raise ValueError(f"{path}: slim-model format version {saved.get('version')!r} (this structkit reads version "
                         f"{VERSION}); save the model again with this structkit's save_slim.")
    try:
        model = _rebuild(saved, build)
    except _Unfit as err:
        raise ValueError(f"{path}: {err}") from None
    if map_location is not None and str(map_location) != "cpu":
        model.to(map_location)
    return model


class _Unfit(Exception):
    """The file's record does not rebuild into a model (message completed with the path by load_slim)."""


def _rebuild(saved: dict[str, Any], build: Callable[[], nn.Module] | None) -> nn.Module:
    modules, state = saved["modules"], saved["state_dict"]
    if not isinstance(modules, dict) or not modules or "" not in modules:
        raise _Unfit("the module record is missing or malformed")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise _Unfit("the state dict is malformed (it must map parameter names to tensors)")
    model = build() if build is not None else _from_source(saved.get("source"), modules[""].get("class"))
    if not isinstance(model, nn.Module):
        raise _Unfit(f"build() returned a {type(model).__name__}, not an nn.Module")
    model.cpu()
    _replace_modules(model, modules, set(state))
    _set_attributes(model, modules)
    _resize_tensors(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise _Unfit(f"its weights do not fit the rebuilt architecture: {' '.join(str(err).split())[:600]}") from None
    found = architecture(model)
    if found != saved["architecture"]:
        changed = sorted(n for n in set(found) | set(saved["architecture"]) if found.get(n) != saved["architecture"].get(n))
        raise _Unfit(f"the rebuilt model's widths / head counts differ from the saved record in {changed[:5]}")
    _check_shapes(model)
    return model


def _from_source(source: Any, root_class: str | None) -> nn.Module:
    if source is None:
        raise _Unfit(f"the file records no way to build the dense model (its model class is {root_class}): pass "
                     f"load_slim(path, build=lambda: ...) returning the dense, unpruned model it was pruned from.")
    if not isinstance(source, dict) or source.get("kind") not in ("structkit", "transformers"):
        raise _Unfit(f"unknown model source {source!r}")
    try:
        if source["kind"] == "structkit":
            from .models import get_model
            name = source["name"]
            if not isinstance(name, str) or (":" in name and not name.startswith("timm:")):
                raise _Unfit(f"the dense model is {name!r}, a callable named by the file; structkit does not import "
                             f"code named in a file: pass build=lambda: ... returning that model.")
            return get_model(name, input_shape=tuple(source["input_shape"]), num_classes=source["num_classes"],
                             **source["options"])
        import transformers
        cls = getattr(transformers, str(source["class"]), None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise _Unfit(f"{source['class']!r} is not a transformers model class")
        config_cls = transformers.CONFIG_MAPPING[source["config"]["model_type"]]
        config = config_cls.from_dict(dict(source["config"]))
        impl = source.get("attn_implementation")
        return cls._from_config(config, **({"attn_implementation": impl} if isinstance(impl, str) else {}))
    except _Unfit:
        raise
    except Exception as err:  # a malformed or unknown source: say so instead of a deep traceback
        raise _Unfit(f"cannot build the dense model from the recorded source ({type(err).__name__}: "
                     f"{' '.join(str(err).split())[:300]}); pass build=lambda: ...") from None


# --- replaced modules: only these classes can be created from a file (a fixed allowlist)

def _key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _conv(cls):
    def make(a, has, _children):
        return cls(a["in_channels"], a["out_channels"], tuple(a["kernel_size"]), stride=tuple(a["stride"]),
                   padding=a["padding"] if isinstance(a["padding"], str) else tuple(a["padding"]),
                   dilation=tuple(a["dilation"]), groups=a["groups"], bias=has("bias"), padding_mode=a["padding_mode"])
    return make


def _binary_conv(a, has, _children):
    shape = a["weight_shape"]
    conv = nn.Conv2d(a["in_channels"], a["out_channels"], tuple(shape[2:]), stride=tuple(a["stride"]),
                     padding=a["padding"] if isinstance(a["padding"], str) else tuple(a["padding"]),
                     dilation=tuple(a["dilation"]), groups=a["groups"], bias=has("bias"))
    return BinaryConv2d(conv)


_FACTORIES: dict[str, Callable] = {
    _key(nn.Linear): lambda a, has, _c: nn.Linear(a["in_features"], a["out_features"], bias=has("bias")),
    _key(nn.Conv1d): _conv(nn.Conv1d), _key(nn.Conv2d): _conv(nn.Conv2d), _key(nn.Conv3d): _conv(nn.Conv3d),
    _key(nn.Sequential): lambda a, has, children: nn.Sequential(OrderedDict(children())),
    _key(PrunedMultiheadAttention): lambda a, has, _c: PrunedMultiheadAttention(
        a["embed_dim"], a["num_heads"], a["head_dim"], list(a["kept_heads"]), a["source_num_heads"],
        bias=has("in_proj_bias"), batch_first=a["batch_first"], dropout=a["dropout"]),
    _key(BinaryLinear): lambda a, has, _c: BinaryLinear(nn.Linear(a["in_features"], a["out_features"],
                                                                  bias=has("bias"))),
    _key(BinaryConv2d): _binary_conv,
}


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _replace_modules(model: nn.Module, modules: dict[str, Any], state_keys: set[str]) -> None:
    """Swap in fresh allowlisted modules where the record's class differs from the dense model's."""
    for name, rec in modules.items():
        if not (isinstance(rec, dict) and isinstance(rec.get("class"), str) and isinstance(rec.get("attrs"), dict)):
            raise _Unfit(f"the record of module {name!r} is malformed")
        current = _get(model, name)
        if current is not None and _class_key(current) == rec["class"]:
            continue
        parent = name.rpartition(".")[0]
        if name == "" or rec["class"] not in _FACTORIES or (parent and _get(model, parent) is None):
            have = _class_key(current) if current is not None else "nothing"
            raise _Unfit(f"the rebuilt dense model has {have} at {name or '<root>'!r} where the file records "
                         f"{rec['class']}; build() must return the model the slim model was pruned from")
        set_submodule(model, name, _make(name, modules, state_keys))
    differ = {n for n, _ in model.named_modules()} ^ set(modules)
    if differ:
        raise _Unfit(f"the rebuilt model's modules differ from the record in {sorted(differ)[:5]}; build() must "
                     f"return the model the slim model was pruned from")


def _make(name: str, modules: dict[str, Any], state_keys: set[str]) -> nn.Module:
    """A fresh module of the recorded (allowlisted) class, with the recorded sizes; its children likewise."""
    rec = modules[name]
    children = [n for n in modules if n.startswith(f"{name}.") and "." not in n[len(name) + 1:]]

    def has(param: str) -> bool:
        return f"{name}.{param}" in state_keys

    def make_children():
        for child in children:
            if modules[child].get("class") not in _FACTORIES:
                raise _Unfit(f"module {child!r}: class {modules[child].get('class')} cannot be created from a file")
            yield child[len(name) + 1:], _make(child, modules, state_keys)
    try:
        return _FACTORIES[rec["class"]](rec["attrs"], has, make_children)
    except _Unfit:
        raise
    except Exception as err:  # missing or ill-typed attributes in the record
        raise _Unfit(f"cannot create module {name!r} ({rec['class']}) from its record ({type(err).__name__}: "
                     f"{err})") from None


def _set_attributes(model: nn.Module, modules: dict[str, Any]) -> None:
    """Set every recorded plain attribute that the module has (with a value of the same type)."""
    for name, m in model.named_modules():
        own = vars(m)
        for key, value in modules[name]["attrs"].items():
            if not isinstance(key, str) or key.startswith("_") or key not in own:
                continue
            old = own[key]
            numbers = {type(old), type(value)} <= {int, float}
            if not _plain(value) or not (old is None or value is None or type(old) is type(value) or numbers
                                         or isinstance(old, (list, tuple)) and isinstance(value, (list, tuple))):
                raise _Unfit(f"attribute {key!r} of module {name!r} is {value!r} in the file; the rebuilt model has "
                             f"a {type(old).__name__} there")
            setattr(m, key, tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value)


def _resize_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each parameter and buffer the saved shape and dtype (fresh storage; tied tensors stay tied)."""
    fresh: dict[int, torch.Tensor] = {}
    for key, saved in state.items():
        owner, _, attr = key.rpartition(".")
        m = _get(model, owner)
        if m is None:
            continue  # an unexpected key: load_state_dict names it
        table = m._parameters if attr in m._parameters else m._buffers if attr in m._buffers else None
        current = table.get(attr) if table is not None else None
        if current is None or (current.shape == saved.shape and current.dtype == saved.dtype):
            continue
        if id(current) not in fresh:
            empty = torch.empty(saved.shape, dtype=saved.dtype)
            fresh[id(current)] = nn.Parameter(empty, requires_grad=current.requires_grad) \
                if isinstance(current, nn.Parameter) else empty
        table[attr] = fresh[id(current)]


def _check_shapes(model: nn.Module) -> None:
    """The weights of every known layer agree with its recorded widths (a file with consistent names but other
    shapes would otherwise load and fail later, inside forward)."""
    for name, m in model.named_modules():
        problem = _shape_problem(m)
        if problem:
            raise _Unfit(f"module {name!r} ({type(m).__name__}): {problem}; the file does not describe a consistent "
                         f"model")


def _shape_problem(m: nn.Module) -> str | None:
    def shape(t):
        return tuple(t.shape) if t is not None else None

    if isinstance(m, nn.Linear) and shape(m.weight) != (m.out_features, m.in_features):
        return f"weight {shape(m.weight)} for {m.in_features} -> {m.out_features} features"
    if isinstance(m, nn.modules.conv._ConvNd):
        want = (m.in_channels, m.out_channels // m.groups) if m.transposed else (m.out_channels, m.in_channels // m.groups)
        if shape(m.weight)[:2] != want or m.in_channels % m.groups or m.out_channels % m.groups:
            return f"weight {shape(m.weight)} for {m.in_channels} -> {m.out_channels} channels in {m.groups} groups"
    if isinstance(m, nn.modules.batchnorm._NormBase):
        sizes = {t.numel() for t in (m.weight, m.bias, m.running_mean, m.running_var) if t is not None}
        if sizes - {m.num_features}:
            return f"parameters of sizes {sorted(sizes)} for {m.num_features} features"
    if isinstance(m, nn.LayerNorm) and m.weight is not None and shape(m.weight) != tuple(m.normalized_shape):
        return f"weight {shape(m.weight)} for normalized_shape {tuple(m.normalized_shape)}"
    if isinstance(m, nn.Embedding) and shape(m.weight) != (m.num_embeddings, m.embedding_dim):
        return f"weight {shape(m.weight)} for {m.num_embeddings} x {m.embedding_dim}"
    if isinstance(m, PrunedMultiheadAttention):
        inner = m.num_heads * m.head_dim
        if shape(m.in_proj_weight) != (3 * inner, m.embed_dim) or m.out_proj.in_features != inner or \
                len(m.kept_heads) != m.num_heads:
            return f"in_proj_weight {shape(m.in_proj_weight)} for {m.num_heads} heads of {m.head_dim} (width {m.embed_dim})"
    elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None and \
            shape(m.in_proj_weight) != (3 * m.embed_dim, m.embed_dim):
        return f"in_proj_weight {shape(m.in_proj_weight)} for width {m.embed_dim}"
    if isinstance(m, (BinaryLinear, BinaryConv2d)):
        rows, n = m.weight_shape[0], math.prod(m.weight_shape)
        if m.packed.numel() != -(-n // 8) or m.scale.numel() != rows:
            return f"{m.packed.numel()} packed bytes and {m.scale.numel()} scales for a weight of shape {m.weight_shape}"
    heads, size = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
    if isinstance(heads, int) and isinstance(size, int) and isinstance(getattr(m, "query", None), nn.Linear):
        if any(getattr(m, p).out_features != heads * size for p in ("query", "key", "value")) or \
                getattr(m, "all_head_size", heads * size) != heads * size:
            return f"query/key/value widths for {heads} heads of {size}"
    return None
