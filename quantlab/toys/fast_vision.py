"""Training-time speed-ups for Qwen2.5-VL's vision tower on the toys' equal-sized images (same results).

The patch embedding (:func:`linear_patch_embed`): transformers applies a ``Conv3d`` whose kernel equals its
stride and the whole patch, i.e. one matrix product per patch, and PyTorch's CPU Conv3d is several times
slower than the same product as ``F.linear`` (forward and backward, measured on this project's 2-core machine
at the hard toy's 1,536-value patches: about 5x). The attention (:func:`batch_equal_chunks`):

transformers' Qwen2.5-VL vision attention (``Qwen2_5_VLVisionAttention.forward``, sdpa/eager path) splits the
packed patch sequence at ``cu_seqlens`` and calls attention once per window or image: at batch 64 that is
several hundred tiny calls per layer, forward and backward. When every chunk has the same length, as on a toy
board (every image the same size, every window full), the chunks stack into one batched call with the same
result. :func:`batch_equal_chunks` swaps that forward in on the model's vision attention modules for training
only; the saved checkpoint and its config are untouched.

:func:`speed_up_vision` installs both.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def equal_chunk_forward(self: nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                        max_seqlen: int | None = None, _original=None, **kwargs) -> torch.Tensor:
    """Qwen2.5-VL vision attention with every ``cu_seqlens`` chunk in one batched sdpa call; falls back to the
    module's original forward when the chunks differ in length."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if bool((lengths != lengths[0]).any()):
        return _original(hidden_states, cu_seqlens, position_embeddings=position_embeddings, max_seqlen=max_seqlen,
                         **kwargs)
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        apply_rotary_pos_emb_vision,
    )

    seq_length, chunk = hidden_states.shape[0], int(lengths[0])
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    # (seq, heads, d) -> (chunks, heads, chunk, d): each chunk attends only within itself, as in the loop.
    q, k, v = (t.reshape(-1, chunk, self.num_heads, t.shape[-1]).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(seq_length, -1))


def batch_equal_chunks(model: nn.Module) -> int:
    """Install :func:`equal_chunk_forward` on every Qwen2.5-VL vision attention module of ``model``; returns how
    many were changed (0 for other families)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VLVisionAttention,
    )

    n = 0
    for module in model.modules():
        if isinstance(module, Qwen2_5_VLVisionAttention):
            original = module.forward
            module.forward = types.MethodType(
                lambda self, *a, _o=original, **kw: equal_chunk_forward(self, *a, _original=_o, **kw), module)
            n += 1
    return n


def linear_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Qwen2_5_VisionPatchEmbed.forward`` as one ``F.linear``: each row of ``hidden_states`` is a flattened
    ``(channels, temporal, patch, patch)`` patch, laid out as the Conv3d kernel's flattened weight."""
    weight = self.proj.weight
    return F.linear(hidden_states.to(weight.dtype), weight.reshape(weight.shape[0], -1), self.proj.bias)


def linear_patch_embed(model: nn.Module) -> int:
    """Install :func:`linear_forward` on every Qwen2.5-VL patch embedding of ``model``; returns how many."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionPatchEmbed,
    )

    n = 0
    for module in model.modules():
        if isinstance(module, Qwen2_5_VisionPatchEmbed):
            module.forward = types.MethodType(linear_forward, module)
            n += 1
    return n


def speed_up_vision(model: nn.Module) -> int:
    """Both speed-ups on ``model`` (a no-op on other families); returns how many modules were changed."""
    return batch_equal_chunks(model) + linear_patch_embed(model)
