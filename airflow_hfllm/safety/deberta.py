"""DeBERTa-v2/v3 disentangled attention through one SDPA call, for :class:`ClassifierChecker`.

transformers has no SDPA path for DeBERTa-v2 (``DisentangledSelfAttention`` is eager only): QK^T, the
content-to-position (c2p) and position-to-content (p2c) scores (each a product with the relative-position
embeddings, then a gather by relative distance), their scaling and sum, the mask, the softmax and AV are
each a pass over a [rows, heads, L, L] tensor, ~30 per layer. Here the two relative-position terms are
gathered straight into one bias [rows, heads, L, L] (already scaled; p2c gathered along the key axis of
its transposed product, so nothing is read strided), the padded keys are masked in it, and SDPA's
memory-efficient kernel does QK^T + bias, the softmax and AV in one kernel: about a third of the memory
traffic, the same math. On a GPU with Triton the bias is one kernel (:mod:`~airflow_hfllm.safety.deberta_kernel`:
the products for the distances a pass can reach, read through a table by distance, no index tensor), and
the bias with SDPA is one custom op a compiled forward calls as it is: 0.257 -> 0.212 s for the standard
batch's checks on an H200, against inductor's fused gathers (docs/benchmarks.md, 2026-12-03, fourth
session). Adding the two terms inside the attention kernel instead (FlexAttention's ``score_mod``, no bias
tensor at all) was measured slower on an H200, and its compiled CPU kernel got lengths off its 128 blocks
wrong. The padding is masked as keys only (transformers also masks padded queries,
whose outputs nothing reads: the classifier pools the first token and real tokens never attend to pads).

:func:`lean_attention` swaps each attention module's ``forward`` for the duration of a ``with`` block,
so the model in the cache stays as transformers made it.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

# Not cuDNN's SDPA: it builds a plan for every new shape, and every pass of a check has a new width.
SDPA_BACKENDS = ("EFFICIENT_ATTENTION", "MATH")


def unsupported_reason(model) -> str | None:
    """Why :func:`lean_attention` cannot run ``model``, or ``None`` when it can."""
    if getattr(model.config, "model_type", None) != "deberta-v2":
        return f"model type {getattr(model.config, 'model_type', None)!r} (DeBERTa-v2/v3 only)"
    modules = _attention_modules(model)
    if not modules:
        return "no DisentangledSelfAttention modules"
    kinds = set(getattr(model.config, "pos_att_type", None) or [])
    if kinds - {"c2p", "p2c"}:
        return f"pos_att_type {sorted(kinds)}"
    if any(not hasattr(m, name) for m in modules for name in ("query_proj", "key_proj", "value_proj")):
        return "unexpected module layout"
    return None


def triton_attention(device):
    """The attention with the Triton bias kernel (:func:`airflow_hfllm.safety.deberta_kernel.attention_op`)
    where it runs: CUDA with Triton installed; else ``None`` (the bias gathered by an index tensor)."""
    if device.type != "cuda":
        return None
    try:
        from airflow_hfllm.safety.deberta_kernel import attention_op
    except ImportError:
        return None
    return attention_op()


def _attention_modules(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "DisentangledSelfAttention"]


@contextmanager
def lean_attention(model, triton: bool = True):
    """Within the block, ``model``'s DeBERTa attention modules run :func:`_forward` (through
    :func:`triton_attention` where it runs, unless ``triton`` is false), and its encoder
    :func:`_relative_positions`."""
    # resolved here, not while torch.compile traces
    kernel = triton_attention(next(model.parameters()).device) if triton else None
    swapped = [(m, "forward", types.MethodType(_forward, m)) for m in _attention_modules(model)]
    swapped += [(m, "triton_attention", kernel) for m in _attention_modules(model)]
    swapped += [(m, "get_rel_pos", types.MethodType(_relative_positions, m)) for m in model.modules()
                if type(m).__name__ == "DebertaV2Encoder"]
    for module, name, value in swapped:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, _ in swapped:
            delattr(module, name)  # back to the class's own


def _relative_positions(self, hidden_states, query_states=None, relative_pos=None):
    """The encoder's ``get_rel_pos`` without its wait on the GPU: transformers' log buckets copy a
    constant to the device (a blocking copy, so once per pass the host waits for the GPU); the same
    buckets here, the constant a Python number."""
    import torch

    if not self.relative_attention or relative_pos is not None or query_states is not None:
        return type(self).get_rel_pos(self, hidden_states, query_states, relative_pos)
    ids = torch.arange(hidden_states.shape[-2], device=hidden_states.device)
    rel = ids[:, None] - ids[None, :]
    buckets, longest = self.position_buckets, self.max_relative_positions
    if buckets > 0 and longest > 0:  # transformers' make_log_bucket_position, op for op
        sign, mid = torch.sign(rel), buckets // 2
        far = torch.where((rel < mid) & (rel > -mid), mid - 1, torch.abs(rel))
        log_pos = torch.ceil(torch.log(far / mid) / torch.log(torch.tensor((longest - 1) / mid)) * (mid - 1)) + mid
        rel = torch.where(far <= mid, rel.type_as(log_pos), log_pos * sign)
    return rel.to(torch.long)[None]


def _forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None,
             rel_embeddings=None):
    import torch
    import torch.nn.functional as F

    cls = type(self)
    b, w, _ = hidden_states.shape
    if output_attentions or query_states is not None or attention_mask.dim() != 4 or (
            relative_pos is not None and relative_pos.numel() != w * w):
        return cls.forward(self, hidden_states, attention_mask, output_attentions, query_states, relative_pos,
                           rel_embeddings)  # what this pass does not cover: the model's own
    heads = self.num_attention_heads

    def split(x):  # [b, w, heads * hd] -> [b, heads, w, hd]
        return x.view(b, w, heads, -1).transpose(1, 2)

    q, k, v = split(self.query_proj(hidden_states)), split(self.key_proj(hidden_states)), \
        split(self.value_proj(hidden_states))
    # transformers scales by the terms named, whether or not relative attention adds them
    scale = (q.shape[-1] * (1 + len({"c2p", "p2c"} & set(self.pos_att_type)))) ** -0.5
    kinds = self.pos_att_type if self.relative_attention else []
    # the encoder's mask is [b, 1, w, w] = keep[i] * keep[j]: its diagonal is each token's own
    keep = torch.diagonal(attention_mask, dim1=-2, dim2=-1).bool()[:, :, None, :]  # [b, 1, 1, w]
    bias = None
    if kinds:
        from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

        if relative_pos is None:
            relative_pos = build_relative_position(q, k, bucket_size=self.position_buckets,
                                                   max_position=self.max_relative_positions)
        rel_pos = relative_pos.reshape(w, w).to(device=q.device, dtype=torch.long)  # bucketed i - j
        span = self.pos_ebd_size
        rel = self.pos_dropout(rel_embeddings)[:2 * span]
        index = (rel_pos + span).clamp(0, 2 * span - 1)  # [i, j]: the embedding of i - j's bucket
        # query i . position key of (i - j); key j . position query of (i - j), as transformers' p2c gathers it
        pos_k = (self.key_proj(rel) if self.share_att_key else self.pos_key_proj(rel)).view(2 * span, heads, -1) \
            if "c2p" in kinds else None
        pos_q = (self.query_proj(rel) if self.share_att_key else self.pos_query_proj(rel)).view(2 * span, heads, -1) \
            if "p2c" in kinds else None
        kernel = self.triton_attention
        if kernel is not None:  # index by distance: i - j = d - (w - 1)
            table = torch.cat([index[0].flip(0), index[1:, 0]]).to(torch.int32)
            out = kernel(q, k, v, pos_k, pos_q, table, keep[:, 0, 0], scale, self.position_buckets,
                         self.max_relative_positions)
            return out.reshape(b, w, -1), None
        index = index.expand(b, heads, w, w)
        terms = []  # (scores by position, the dim to gather along)
        if pos_k is not None:
            terms.append((torch.einsum("bhid,phd->bhip", q * scale, pos_k), -1))
        if pos_q is not None:
            terms.append((torch.einsum("phd,bhjd->bhpj", pos_q, k * scale), -2))  # positions first: along dim -2
        if torch.compiler.is_compiling():  # inductor fuses the gathers and the sum, and aligns the bias for SDPA
            bias = sum(torch.gather(x, dim, index) for x, dim in terms)
        else:
            # rows of the bias padded to 8 elements: SDPA's memory-efficient kernel takes it as is (an
            # unaligned one it copies into an aligned one first)
            bias = torch.empty(b, heads, w, -(-w // 8) * 8, dtype=q.dtype, device=q.device)[..., :w]
            torch.gather(*terms[0], index, out=bias)
            for x, dim in terms[1:]:
                bias.add_(torch.gather(x, dim, index))
    mask = keep if bias is None else bias.masked_fill_(~keep, torch.finfo(bias.dtype).min)
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, name) for name in SDPA_BACKENDS]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(b, w, -1), None
