"""Built-in models, and one way to name any model: ``get_model(name, input_shape=..., num_classes=...)``.

``name`` is one of

* a registered built-in (``list_models()``; register more with ``@register_model``);
* a torchvision classification model (``"resnet18"``, ``"mobilenet_v3_small"``, ...; 3-channel inputs);
* ``"timm:<name>"``, a timm model (``"timm:resnet18"``; needs the ``zoo`` extra);
* ``"package.module:callable"``, imported and called with the options.

``init`` says which weights the model starts from: ``"random"``, ``"pretrained"`` (torchvision / timm weights from
the local cache; nothing is ever downloaded) or the path of a state dict, checkpoint or structkit run folder
(:mod:`structkit.zoo`).

The built-in vision models are made for exact structured pruning: convolutions without bias, each followed by
BatchNorm2d and ReLU (so a zero channel group maps to an exactly zero activation), and no LayerNorm/GroupNorm,
whose statistics span channels (see ``docs/structure.md``). Their module names are stable and readable:

* ``mlp`` / ``mlp7``: ``flatten``, ``features.fc1``, ``features.relu1``, ..., ``classifier``;
* ``cnn`` / ``vgg_small``: ``features.conv{i}``, ``features.bn{i}``, ``features.relu{i}`` (i = 1, 2, ... counts
  convolutions, whether or not pools were skipped), ``features.pool{j}`` (max-pools), then ``pool`` (global
  average), ``flatten``, ``classifier``;
* ``resnet_small``: ``stem.{conv,bn,relu}``, ``layer{s}.{b}.{conv1,bn1,relu1,conv2,bn2,shortcut,relu2}``,
  ``pool``, ``flatten``, ``classifier``;
* ``tiny_transformer_lm``: ``tok_emb``, ``pos_emb``, ``blocks.{i}.{ln1,attn,ln2,ffn.fc1,ffn.act,ffn.fc2}``,
  ``norm``, ``head``.
"""
from __future__ import annotations

import difflib
import inspect
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import zoo
from ._imports import import_callable
from .registry import Registry

__all__ = ["register_model", "get_model", "list_models", "model_builder", "MLP", "ConvNet", "BasicBlock", "ResNetSmall",
           "TransformerBlock", "TinyTransformerLM", "mlp", "mlp7", "cnn", "vgg_small", "resnet_small",
           "tiny_transformer_lm"]

_MODELS: Registry[Callable[..., nn.Module]] = Registry("model", how="register more with @structkit.models.register_model")


def register_model(name: str, *, replace: bool = False) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make ``fn(*, input_shape, num_classes, **options) -> nn.Module`` available as
    ``get_model(name, ...)``. The builder should accept (and may ignore) ``input_shape`` and ``num_classes``.
    A taken name is refused unless ``replace``."""
    return _MODELS.register(name, replace=replace)


def list_models() -> list[str]:
    """Names of the registered built-in models, sorted (torchvision names and ``module:callable`` also work)."""
    return _MODELS.names()


def model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name`` (a built-in or ``@register_model`` name; raises ValueError otherwise)."""
    return _MODELS.get(name)


def get_model(name: str, *, input_shape: Sequence[int], num_classes: int, init: str | os.PathLike = "random",
              **options) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` (without the batch dimension) and
    ``num_classes`` outputs, starting from the weights ``init`` says; ``options`` go to the builder.

    Registered names are looked up first, then ``"timm:<name>"`` (``timm.create_model(name, num_classes=...,
    in_chans=input_shape[0], **options)``), then ``"package.module:callable"``, then torchvision classification
    models (``torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)``).
    A ``module:callable`` is called with ``options``, plus ``input_shape`` if it names that parameter and
    ``num_classes`` if it names it or takes ``**kwargs`` (as torchvision's and timm's builders do).

    ``init``: ``"random"`` (the builder's initialisation), ``"pretrained"`` (torchvision and timm models only; the
    weights must be in the local cache, see :func:`structkit.zoo.pretrained_file`), or the path of a state dict, a
    checkpoint holding one under ``"model"`` / ``"state_dict"``, or a structkit run folder
    (:func:`structkit.zoo.load_init`; keys and shapes must match).
    """
    input_shape = tuple(input_shape)
    init = os.fspath(init)
    pretrained = init == "pretrained"
    if pretrained:
        zoo.pretrained_file(name)  # before building: a model without (cached) pretrained weights fails here
    if name in _MODELS:
        model = _MODELS.get(name)(input_shape=input_shape, num_classes=num_classes, **options)
    elif zoo.is_timm(name):
        model = zoo.build_timm(name, input_shape, num_classes, options, pretrained=pretrained)
    elif ":" in name:
        model = _from_callable(name, input_shape, num_classes, options)
    elif name in zoo.torchvision_names():
        model = zoo.build_torchvision(name, input_shape, num_classes, options)
        if pretrained:
            zoo.load_torchvision_pretrained(model, name, num_classes)
    else:
        known = list_models() + zoo.torchvision_names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Use a built-in ({', '.join(list_models())}), a torchvision "
                         f"classification model name (torchvision.models.list_models(module=torchvision.models)), "
                         f"'timm:<name>' for a timm model, or 'package.module:callable' for your own builder.")
    if init not in ("random", "pretrained"):
        zoo.load_init(model, init)
    return model


def _from_callable(name: str, input_shape: tuple, num_classes: int, options: dict) -> nn.Module:
    """Import and call ``"package.module:callable"`` (see :func:`get_model`)."""
    builder = import_callable(name, "model")
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # some builtins have no signature: pass the options only
        params = {}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {}
    if "input_shape" in params:
        extra["input_shape"] = input_shape
    if "num_classes" in params or takes_kwargs:
        extra["num_classes"] = num_classes
    model = builder(**extra, **options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} returned a {type(model).__name__}; a model builder must return an "
                        f"nn.Module.")
    return model


def _image_shape(model: str, input_shape: tuple) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{model} needs input_shape (channels, height, width); got {input_shape}. "
                         f"Use 'mlp' for flat inputs.")
    return tuple(int(s) for s in input_shape)


def _init_conv_bn(model: nn.Module) -> None:
    """He initialisation for ReLU convolutions; BatchNorm starts as the identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------- MLPs

class MLP(nn.Module):
    """Fully connected ReLU network: ``flatten``, then ``features`` (``fc{i}``, ``relu{i}``), then
    ``classifier``. A zero row of ``fc{i}`` (with its bias) is an exactly removable neuron."""

    def __init__(self, in_features: int, widths: Sequence[int], num_classes: int):
        super().__init__()
        layers, width = OrderedDict(), in_features
        for i, w in enumerate(widths, start=1):
            layers[f"fc{i}"] = nn.Linear(width, w)
            layers[f"relu{i}"] = nn.ReLU()
            width = w
        self.flatten = nn.Flatten()
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.flatten(x)))


@register_model("mlp")
def mlp(*, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (512, 512)) -> MLP:
    """MLP with hidden ``widths`` on the flattened input (any ``input_shape``)."""
    return MLP(math.prod(input_shape), widths, num_classes)


@register_model("mlp7")
def mlp7(*, input_shape: Sequence[int], num_classes: int, width: int = 512) -> MLP:
    """The 7-layer MLP of the RAMDA paper's Fashion-MNIST low-rank (nuclear-norm) experiments: 6 hidden layers
    and the output layer, i.e. 7 Linear layers.

    Assumption: the paper gives the depth, not the widths; we use ``width`` = 512 units in every hidden layer
    (784-512x6-10 on Fashion-MNIST, 1.72M parameters). Change ``width`` if you reproduce another reading.
    """
    return MLP(math.prod(input_shape), (width,) * 6, num_classes)


# --------------------------------------------------------------------------------------------------- plain CNNs

class ConvNet(nn.Module):
    """Plain BatchNorm CNN: ``features`` (3x3 ``conv{i}`` without bias, ``bn{i}``, ``relu{i}``, and
    ``pool{j}`` max-pools after the convolutions listed in ``pool_after``), then global average ``pool``,
    ``flatten`` and a linear ``classifier``.

    A max-pool is skipped when it would shrink the feature map below 2x2, so the same architecture runs on
    8x8 digits and 28x28 images; the input size only changes where the pools are.
    """

    def __init__(self, input_shape: tuple[int, int, int], widths: Sequence[int], pool_after: Sequence[int],
                 num_classes: int):
        super().__init__()
        bad = [p for p in pool_after if not 1 <= p <= len(widths)]
        if bad:
            raise ValueError(f"pool_after counts convolutions from 1 to {len(widths)}; got {bad}.")
        channels, height, width = input_shape
        layers, n_pools = OrderedDict(), 0
        for i, w in enumerate(widths, start=1):
            layers[f"conv{i}"] = nn.Conv2d(channels, w, kernel_size=3, padding=1, bias=False)
            layers[f"bn{i}"] = nn.BatchNorm2d(w)
            layers[f"relu{i}"] = nn.ReLU()
            channels = w
            if i in pool_after and height // 2 >= 2 and width // 2 >= 2:
                n_pools += 1
                layers[f"pool{n_pools}"] = nn.MaxPool2d(2)
                height, width = height // 2, width // 2
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


@register_model("cnn")
def cnn(*, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (32, 32, 64, 64, 128),
        pool_after: Sequence[int] = (2, 4)) -> ConvNet:
    """The quickstart CNN of ``docs/quickstart.md``: 5 convolutions 32-32-M-64-64-M-128 (22.2M MACs on
    28x28)."""
    return ConvNet(_image_shape("cnn", tuple(input_shape)), widths, pool_after, num_classes)


@register_model("vgg_small")
def vgg_small(*, input_shape: Sequence[int], num_classes: int,
              widths: Sequence[int] = (64, 64, 128, 128, 256, 256), pool_after: Sequence[int] = (2, 4, 6)) -> ConvNet:
    """VGG-style BatchNorm CNN 64-64-M-128-128-M-256-256-M for 28x28 images, with a global-average-pool
    head instead of VGG's large fully connected layers (fewer parameters, any input size)."""
    return ConvNet(_image_shape("vgg_small", tuple(input_shape)), widths, pool_after, num_classes)


# --------------------------------------------------------------------------------------------------- ResNet

class BasicBlock(nn.Module):
    """ResNet basic block: ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is a 1x1 convolution + BatchNorm when the stride or width changes, else the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                bn=nn.BatchNorm2d(out_channels)))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """CIFAR-style ResNet: 3x3 ``stem``, one stage ``layer{s}`` of :class:`BasicBlock` per width (the first at
    stride 1, the others at stride 2), global average ``pool``, ``flatten``, linear ``classifier``."""

    def __init__(self, input_shape: tuple[int, int, int], widths: Sequence[int], blocks: Sequence[int],
                 num_classes: int):
        super().__init__()
        if len(widths) != len(blocks) or not all(b >= 1 for b in blocks):
            raise ValueError(f"resnet_small needs one block count >= 1 per stage width; got widths={tuple(widths)}"
                             f", blocks={tuple(blocks)}.")
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(widths[0]),
            relu=nn.ReLU()))
        channels = widths[0]
        for s, (width, n_blocks) in enumerate(zip(widths, blocks), start=1):
            stage = [BasicBlock(channels, width, stride=1 if s == 1 else 2)]
            stage += [BasicBlock(width, width, stride=1) for _ in range(n_blocks - 1)]
            self.add_module(f"layer{s}", nn.Sequential(*stage))
            channels = width
        self.num_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.classifier(self.flatten(self.pool(x)))


@register_model("resnet_small")
def resnet_small(*, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (16, 32, 64),
                 blocks: Sequence[int] = (1, 1, 1)) -> ResNetSmall:
    """Small CIFAR-style ResNet (ResNet-8 by default; ``blocks=(2, 2, 2)`` gives ResNet-14). Stages 2 and 3
    halve the spatial size: 28x28 -> 7x7, 8x8 -> 2x2."""
    return ResNetSmall(_image_shape("resnet_small", tuple(input_shape)), widths, blocks, num_classes)


# --------------------------------------------------------------------------------------------------- language model

class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``.

    ``attn`` is an ``nn.MultiheadAttention`` (batch-first) used as the container of the fused q/k/v projection
    (``in_proj_weight`` rows ``[q; k; v]``, head h owning rows ``h*head_dim:(h+1)*head_dim`` of each) and
    ``out_proj``. The forward computes attention from those tensors and ``attn.num_heads`` only, so whole heads
    can be removed exactly: slice the head's q/k/v rows of ``in_proj_weight``/``in_proj_bias`` and its columns
    of ``out_proj.weight``, then set ``attn.num_heads``. (``nn.MultiheadAttention.forward`` cannot run after
    that: it derives the head size from ``embed_dim // num_heads``.) The 1/sqrt(head_dim) scaling is unchanged.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(OrderedDict(fc1=nn.Linear(d_model, d_ff), act=nn.GELU(),
                                             fc2=nn.Linear(d_ff, d_model)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(self.ln1(x), attn_mask)
        return x + self.ffn(self.ln2(x))

    def _attention(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)  # [B, T, 3 * heads * head_dim]
        q, k, v = qkv.unflatten(-1, (3, self.attn.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, heads, T, head_dim]
        return self.attn.out_proj(y.transpose(1, 2).flatten(2))


class TinyTransformerLM(nn.Module):
    """Small causal language model: token + learned position embeddings, ``n_layers`` pre-LN
    :class:`TransformerBlock`\\ s, final LayerNorm ``norm`` and linear ``head``.

    ``forward(tokens)`` maps a LongTensor [B, T] (T <= ``max_len``) to logits [B, T, vocab_size]. The causal
    mask is a buffer sliced to T (no data-dependent control flow), so the model exports to ONNX with a
    dynamic batch and sequence length.
    """

    def __init__(self, vocab_size: int, d_model: int = 128, n_heads: int = 4, n_layers: int = 2,
                 d_ff: int = 512, max_len: int = 128):
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.register_buffer("positions", torch.arange(max_len), persistent=False)
        causal = torch.full((max_len, max_len), float("-inf")).triu(diagonal=1)  # 0 on and below the diagonal
        self.register_buffer("causal_mask", causal, persistent=False)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        # A shape check, not data-dependent; the TorchScript tracer would still warn about it, so skip it there.
        if not torch.jit.is_tracing() and length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}; build the model with a "
                             f"larger max_len or feed shorter windows.")
        x = self.tok_emb(tokens) + self.pos_emb(self.positions[:length])
        mask = self.causal_mask[:length, :length]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


@register_model("tiny_transformer_lm")
def tiny_transformer_lm(*, input_shape: Sequence[int], num_classes: int, vocab_size: int | None = None,
                        d_model: int = 128, n_heads: int = 4, n_layers: int = 2, d_ff: int = 512,
                        max_len: int = 128) -> TinyTransformerLM:
    """:class:`TinyTransformerLM`; ``vocab_size`` defaults to ``num_classes`` (a language-model data set's
    classes are its tokens). ``input_shape`` is ignored: the sequence length only has to be <= ``max_len``."""
    return TinyTransformerLM(num_classes if vocab_size is None else vocab_size, d_model, n_heads, n_layers,
                             d_ff, max_len)
