"""``nn.MultiheadAttention`` with its projections as modules, so that they can be sparse.

``nn.MultiheadAttention`` keeps its q, k and v projections as raw parameters
(``in_proj_weight``, or ``q_proj_weight`` ... when the key and value widths differ) and reads
``out_proj.weight`` directly in ``F.multi_head_attention_forward``: none of them is ever a
call of a Linear, so no rewrite can reach them. ``sparsefx.transform`` swaps every
``nn.MultiheadAttention`` for a ``MultiheadAttention`` here: the same computation (its
``forward`` takes the same arguments and returns the same outputs, batch_first either way,
masks, ``need_weights``, ``add_bias_kv``, ``add_zero_attn``), with ``q_proj``, ``k_proj``,
``v_proj`` and ``out_proj`` as ``nn.Linear`` modules, which the transform then makes sparse
like any other Linear. ``to_torch()`` (used by ``sparsefx.densify``) gives back an
``nn.MultiheadAttention``; loading a state dict saved from an ``nn.MultiheadAttention``
(``in_proj_weight``, ...) into a dense ``MultiheadAttention`` maps its keys.

Its ``in_proj_weight`` and ``in_proj_bias`` are ``None`` and ``_qkv_same_embed_dim`` is
``False``: the fused inference paths of ``nn.TransformerEncoderLayer`` /
``nn.TransformerEncoder`` (which read those parameters and the layers' ``.weight``) then step
aside, and the layers run their ordinary forward, which calls the modules.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MultiheadAttention", "swap_attention"]


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with module projections (see the module docstring)."""

    in_proj_weight = None  # the fused paths of nn.Transformer* check these: see above
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim={embed_dim} is not a multiple of "
                             f"num_heads={num_heads}")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.head_dim = embed_dim // num_heads
        self.batch_first, self.add_zero_attn = batch_first, add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._register_load_state_dict_pre_hook(_from_torch_keys)

    @classmethod
    def from_torch(cls, attention: nn.MultiheadAttention) -> MultiheadAttention:
        """The same attention, its weights copied (on the same device and dtype; on meta, no
        data)."""
        reference = attention.out_proj.weight
        new = cls(attention.embed_dim, attention.num_heads, attention.dropout,
                  bias=attention.in_proj_bias is not None,
                  add_bias_kv=attention.bias_k is not None,
                  add_zero_attn=attention.add_zero_attn, kdim=attention.kdim,
                  vdim=attention.vdim, batch_first=attention.batch_first,
                  device=reference.device, dtype=reference.dtype)
        new.load_state_dict(attention.state_dict())
        new.train(attention.training)
        return new

    def to_torch(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` computing the same (dense projections; sparse ones are
        densified)."""
        weights = {name: _dense(getattr(self, name)) for name in
                   ("q_proj", "k_proj", "v_proj", "out_proj")}
        reference = weights["out_proj"][0]
        attention = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, self.dropout,
            bias=weights["q_proj"][1] is not None, add_bias_kv=self.bias_k is not None,
            add_zero_attn=self.add_zero_attn, kdim=self.kdim, vdim=self.vdim,
            batch_first=self.batch_first, device=reference.device, dtype=reference.dtype)
        state = {"out_proj.weight": weights["out_proj"][0]}
        if weights["out_proj"][1] is not None:
            state["out_proj.bias"] = weights["out_proj"][1]
        else:
            attention.out_proj.bias = None
        if attention._qkv_same_embed_dim:
            state["in_proj_weight"] = torch.cat([weights[n][0] for n in ("q_proj", "k_proj",
                                                                          "v_proj")])
        else:
            for name in ("q", "k", "v"):
                state[f"{name}_proj_weight"] = weights[f"{name}_proj"][0]
        if weights["q_proj"][1] is not None:
            state["in_proj_bias"] = torch.cat([weights[n][1] for n in ("q_proj", "k_proj",
                                                                        "v_proj")])
        if self.bias_k is not None:
            state["bias_k"], state["bias_v"] = self.bias_k.detach(), self.bias_v.detach()
        attention.load_state_dict(state)
        attention.train(self.training)
        return attention

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal=True needs attn_mask (as "
                               "nn.MultiheadAttention: it is a hint about attn_mask)")
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # (N, L, E) -> (L, N, E), the layout below
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        target, batch = query.shape[0], query.shape[1]
        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)
        mask = _additive(attn_mask, q.dtype)
        padding = _additive(key_padding_mask, q.dtype)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, batch, -1)])
            v = torch.cat([v, self.bias_v.expand(1, batch, -1)])
            mask, padding = F.pad(mask, (0, 1)) if mask is not None else None, \
                F.pad(padding, (0, 1)) if padding is not None else None
        heads, head_dim = self.num_heads, self.head_dim
        # (L, N, E) -> (N, H, L, D)
        q, k, v = (t.reshape(t.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3)
                   for t in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(batch, heads, 1, head_dim)], dim=2)
            mask, padding = F.pad(mask, (0, 1)) if mask is not None else None, \
                F.pad(padding, (0, 1)) if padding is not None else None
        source = k.shape[2]
        bias = None
        if mask is not None:  # (L, S) or (N * H, L, S)
            bias = mask.view(batch, heads, target, source) if mask.dim() == 3 else mask
        if padding is not None:  # (N, S)
            padding = padding.view(batch, 1, 1, source)
            bias = padding if bias is None else bias + padding
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * (1.0 / math.sqrt(head_dim))) @ k.transpose(-2, -1)
            if bias is not None:
                scores = scores + bias
            weights = torch.softmax(scores, dim=-1)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
            weights = None
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(target, batch, self.embed_dim))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A mask as nn.MultiheadAttention reads it (True or a float added: bool True masks a
    position out) as a float to add to the scores."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf"))
    return mask.to(dtype)


def _dense(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of a projection, sparse or not, detached."""
    weight = layer.dense_weight() if hasattr(layer, "dense_weight") else layer.weight
    bias = None if layer.bias is None else layer.bias.detach()
    return weight.detach(), bias


def _from_torch_keys(state_dict, prefix, local_metadata, strict, missing_keys,
                     unexpected_keys, error_msgs) -> None:
    """Load hook: an ``nn.MultiheadAttention``'s entries (``in_proj_weight`` or
    ``q_proj_weight`` ..., ``in_proj_bias``) become the projections' ``weight`` and
    ``bias``."""
    packed = state_dict.pop(prefix + "in_proj_weight", None)
    if packed is not None:
        for name, part in zip("qkv", packed.chunk(3)):
            state_dict[f"{prefix}{name}_proj.weight"] = part
    for name in "qkv":
        separate = state_dict.pop(f"{prefix}{name}_proj_weight", None)
        if separate is not None:
            state_dict[f"{prefix}{name}_proj.weight"] = separate
    bias = state_dict.pop(prefix + "in_proj_bias", None)
    if bias is not None:
        for name, part in zip("qkv", bias.chunk(3)):
            state_dict[f"{prefix}{name}_proj.bias"] = part


def swap_attention(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (in place) by a
    ``MultiheadAttention``; returns their names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.MultiheadAttention:  # a subclass may compute otherwise
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, MultiheadAttention.from_torch(module))
            swapped.append(name)
    for module in model.modules():
        # its inference path packs padded batches into nested tensors, which only the fused
        # layers take: the layers' ordinary forward runs on the padded batch instead (padded
        # positions then hold computed values, not zeros)
        if isinstance(module, nn.TransformerEncoder) and swapped:
            module.use_nested_tensor = False
    return swapped
