"""Batched attention for the Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers without flash-attn.

Qwen2.5-VL's tower attends within windows (8 x 8 patches in 28 of 32 blocks) and within each image (the
other 4; Qwen2-VL's and Qwen3-VL's in every block). With flash-attn that is one varlen call per block;
with any other attention implementation transformers splits the sequence and calls attention once per
window (or image), in Python: a batch of 256 Qwen2.5-VL images at the default pixel bounds is ~20,000
windows, so ~600,000 small kernel launches per batch, which made the vision tower most of the time of a
batch. :func:`pack_vision_attention` replaces the attention modules' ``forward`` (on this model's
instances only) with one that gathers all sequences of equal length into one batched
``scaled_dot_product_attention`` call: a handful of calls per block, the same math (projections, rotary
embedding, scaling) as the module's own.
"""

from __future__ import annotations

import sys
import types
from collections import OrderedDict

_PLANS: OrderedDict = OrderedDict()  # a forward's few cu_seqlens come back in every block


def _plan(cu_seqlens):
    """[(length, index [n, length])] grouping the sequences of ``cu_seqlens`` by length."""
    import torch

    bounds = cu_seqlens.tolist()
    key = (str(cu_seqlens.device), tuple(bounds))
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    starts: dict[int, list[int]] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            starts.setdefault(b - a, []).append(a)
    plan = []
    for length, firsts in starts.items():
        first = torch.tensor(firsts, device=cu_seqlens.device)
        plan.append((length, first[:, None] + torch.arange(length, device=cu_seqlens.device)[None, :]))
    _PLANS[key] = plan
    while len(_PLANS) > 8:
        _PLANS.popitem(last=False)
    return plan


def varlen_attention(q, k, v, cu_seqlens, scale: float):
    """Non-causal attention within each sequence of ``cu_seqlens``; q, k, v and the result are [S, H, D]."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(q)
    for _, index in _plan(cu_seqlens):
        o = F.scaled_dot_product_attention(q[index].transpose(1, 2), k[index].transpose(1, 2),
                                           v[index].transpose(1, 2), scale=scale)
        out[index] = o.transpose(1, 2)
    return out


def _packed_forward(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kwargs):
    import torch

    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    if position_embeddings is None:  # older transformers pass the rotary angles
        emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
        position_embeddings = (emb.cos(), emb.sin())
    cos, sin = position_embeddings
    q, k = self._hfllm_rotary(q, k, cos, sin)
    out = varlen_attention(q, k, v, cu_seqlens, self.scaling if hasattr(self, "scaling") else q.shape[-1] ** -0.5)
    return self.proj(out.reshape(seq, -1))


def pack_vision_attention(model) -> int:
    """Patch the vision attention modules of ``model`` (Qwen2-VL / Qwen2.5-VL / Qwen3-VL) to batched
    attention, unless it runs flash-attn (already varlen). Returns how many modules were patched."""
    visual = getattr(getattr(model, "model", model), "visual", None) or getattr(model, "visual", None)
    if visual is None or "flash" in str(getattr(visual.config, "_attn_implementation", "")):
        return 0
    patched = 0
    for module in visual.modules():
        if not type(module).__name__.endswith("VisionAttention") or not hasattr(module, "qkv"):
            continue
        rotary = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb_vision", None)
        if rotary is None or not hasattr(module, "proj"):
            continue
        module._hfllm_rotary = rotary
        module.forward = types.MethodType(_packed_forward, module)
        patched += 1
    return patched
