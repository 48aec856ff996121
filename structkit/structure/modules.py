"""Modules that slim models are rebuilt with when a stock module cannot express the result.

* :class:`PrunedMultiheadAttention` -- ``nn.MultiheadAttention`` with whole heads removed. The stock module
  ties the inner width ``num_heads * head_dim`` to the model width ``embed_dim`` (its fused input projection
  splits the 3E rows by the *input* width), so removing heads needs a module where the two differ.
* :class:`BinaryLinear`, :class:`BinaryConv2d` -- layers whose rows are ``a_r * sign(W_r)``, stored as
  one bit per weight plus one scale per row.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention whose heads were pruned: ``num_heads * head_dim`` may be smaller than ``embed_dim``.

    Same call signature and masking rules as ``nn.MultiheadAttention`` (``batch_first``, boolean or float
    ``attn_mask`` of shape (L, S) or (B * source_num_heads, L, S), ``key_padding_mask``, ``need_weights``,
    ``is_causal``). The scale stays ``1 / sqrt(head_dim)``: heads are removed whole, so the kept heads compute
    exactly what they computed before, and a removed head contributed ``W_o[:, h] @ head_h = 0`` because its
    output-projection columns were zero. Attention weights returned with ``need_weights=True`` cover the kept
    heads only, so their head average differs from the dense module's.

    ``_qkv_same_embed_dim`` is False so that ``nn.TransformerEncoderLayer`` never routes it to its fused
    fast path (which assumes the inner width equals ``embed_dim``).
    """

    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, kept_heads: list[int], source_num_heads: int,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kept_heads, self.source_num_heads = list(kept_heads), source_num_heads
        self.batch_first, self.dropout = batch_first, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, device=device, dtype=dtype))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, device=device, dtype=dtype)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, keep: list[int]) -> PrunedMultiheadAttention:
        """Copy the kept heads (indices into ``mha``'s heads) of a fused ``nn.MultiheadAttention``."""
        d, e, inner = mha.head_dim, mha.embed_dim, mha.num_heads * mha.head_dim
        source_heads = getattr(mha, "kept_heads", list(range(mha.num_heads)))
        rows = torch.tensor([p * inner + h * d + r for p in range(3) for h in keep for r in range(d)])
        cols = torch.tensor([h * d + r for h in keep for r in range(d)])
        w = mha.in_proj_weight
        new = cls(e, len(keep), d, [source_heads[h] for h in keep], getattr(mha, "source_num_heads", mha.num_heads),
                  bias=mha.in_proj_bias is not None, batch_first=mha.batch_first, dropout=mha.dropout,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.in_proj_weight.copy_(w[rows])
            if mha.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias[rows])
                new.out_proj.bias.copy_(mha.out_proj.bias)
            new.out_proj.weight.copy_(mha.out_proj.weight[:, cols])
        new.train(mha.training)
        return new

    def _mask(self, attn_mask, key_padding_mask, batch: int, q_len: int, k_len: int, dtype) -> torch.Tensor | None:
        """One additive float mask of shape (B, H, L, S) (or broadcastable), -inf where attention is not allowed."""
        def additive(m):
            return torch.zeros_like(m, dtype=dtype).masked_fill_(m, -math.inf) if m.dtype == torch.bool else m.to(dtype)

        mask = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 3:  # (B * source heads, L, S): keep the rows of the kept heads
                mask = mask.view(batch, self.source_num_heads, q_len, k_len)[:, self.kept_heads]
        if key_padding_mask is not None:
            pad = additive(key_padding_mask).view(batch, 1, 1, k_len)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, q_len, _ = query.shape
        k_len, h, d = key.shape[1], self.num_heads, self.head_dim
        w = self.in_proj_weight.chunk(3)
        bias = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w[0], bias[0]).view(b, q_len, h, d).transpose(1, 2)
        k = F.linear(key, w[1], bias[1]).view(b, k_len, h, d).transpose(1, 2)
        v = F.linear(value, w[2], bias[2]).view(b, k_len, h, d).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, b, q_len, k_len, q.dtype)
        causal = is_causal and mask is None
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d)
            if causal:
                scores = scores.masked_fill(torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).triu(1), -math.inf)
            if mask is not None:
                scores = scores + mask
            attn = F.dropout(scores.softmax(-1), p, self.training)
            out = attn @ v
            weights = attn.mean(1) if average_attn_weights else attn
            if unbatched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(b, q_len, h * d))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def pack_signs(weight: torch.Tensor) -> torch.Tensor:
    """Signs of a tensor as bits (1 = non-negative), eight per uint8, C order."""
    bits = (weight.reshape(-1) >= 0).to(torch.uint8)
    bits = F.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=bits.device)).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: a tensor of +1/-1 of the given shape."""
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return (bits.view(-1)[:math.prod(shape)].to(dtype) * 2 - 1).view(shape)


class _Binary(nn.Module):
    """Shared storage of binary layers: ``packed`` sign bits, per-row ``scale``, optional float ``bias``.
    The float weight ``scale_r * sign`` is rebuilt on every call (exactly the trained weight); structkit
    ships no binary kernel, so this saves storage, not time."""

    def _store(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight_shape = tuple(weight.shape)
        self.register_buffer("packed", pack_signs(weight.detach()))
        self.register_buffer("scale", weight.detach().abs().flatten(1).amax(1))
        self.register_parameter("bias", nn.Parameter(bias.detach().clone()) if bias is not None else None)

    @property
    def weight(self) -> torch.Tensor:
        signs = unpack_signs(self.packed, torch.Size(self.weight_shape), self.scale.dtype)
        return signs * self.scale.view(-1, *[1] * (len(self.weight_shape) - 1))

    def packed_bits(self) -> int:
        """Storage of the weight: one bit per entry plus one float per row."""
        return math.prod(self.weight_shape) + self.scale.numel() * self.scale.element_size() * 8


class BinaryLinear(_Binary):
    """A Linear layer whose rows are ``a_r * sign(W_r)`` (see :class:`_Binary`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class BinaryConv2d(_Binary):
    """A Conv2d layer (zero padding) whose filters are ``a_r * sign(W_r)`` (see :class:`_Binary`)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._store(conv.weight, conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _attention_macs(module: PrunedMultiheadAttention, inputs, output) -> None:
    """MACs of the projections and the attention products (the output projection is counted by its Linear),
    for torch-pruning's op counter (which only sees positional inputs)."""
    if len(inputs) < 2:
        return
    q, k = inputs[0], inputs[1]
    if q.dim() == 2:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
    elif not module.batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    b, q_len, e = q.shape
    k_len, inner = k.shape[1], module.num_heads * module.head_dim
    module.__flops__ += int(b * ((q_len + 2 * k_len) * e * inner + 2 * q_len * k_len * inner))


def _binary_macs(module: _Binary, inputs, output) -> None:
    module.__flops__ += int(output.numel() * math.prod(module.weight_shape[1:]))


#: torch-pruning op-counter hooks for the modules above
MAC_COUNTERS = {PrunedMultiheadAttention: _attention_macs, BinaryLinear: _binary_macs, BinaryConv2d: _binary_macs}
