"""The verdict of a causal-LM checker in one lean forward pass over its own modules.

A Llama Guard check reads a shared prefix (KV cached once), the row's own tokens, and needs only the
next-token logits at each row's last token. transformers' forward pads rows on the left, so every
layer builds a per-row padding mask, attention falls back to the masked memory-efficient kernel, and
the prefix cache is concatenated through ``DynamicCache``. Here instead:

- rows are padded on the *right*: under causal attention a real token never sees the padding after
  it, so no mask is needed and all rows share positions ``prefix + 0..w-1``;
- attention is two flash attention calls merged by their log-sum-exp (:func:`prefix_attention`): every
  row's queries as one sequence over the shared prefix's keys (no mask, the prefix never copied per row),
  and each row causally over its own keys;
- on a GPU the q/k/v and gate/up projections are fused (``engine/arch/fuse.py``, as the fast engine's):
  one GEMM and, in FP8, one activation quantization where there were three (two);
- the last layer projects keys and values for every token but runs its query, attention output and
  MLP for each row's last token only (the only one whose logits are read): about 1/layers of the
  pass's matmul FLOPs saved.

Supports what the fast engine supports (Llama/Qwen2/Mistral-style decoders, unquantized or FP8); anything
else keeps transformers' forward (:meth:`LlamaGuardChecker._run`).
"""

from __future__ import annotations

from airflow_hfllm.engine.arch.fuse import fuse_projections
from airflow_hfllm.engine.arch.layer import decoder_layer, project_qkv, rotate_half, text_config, text_model
from airflow_hfllm.engine.compiled import Compiler
from airflow_hfllm.engine.loading import LoadedModel


class VerdictPass:
    """``logits(ids, lengths, prefix)``: next-token logits [n, vocab] (fp32) after each row's last token.

    :param compile: ``torch.compile`` the pass (dynamic shapes), fusing norms, rotary and activations; a
        compile failure runs it eagerly from then on, with one warning naming ``name``
        (:class:`~airflow_hfllm.engine.compiled.Compiler`, the fast engine's).
    """

    def __init__(self, loaded: LoadedModel, compile: bool, name: str = "verdict pass"):
        model = loaded.model
        cfg = text_config(model.config)
        self.base = text_model(model)
        self.layers = list(self.base.layers)
        self.head = model.get_output_embeddings()
        heads = cfg.num_attention_heads
        self.dims = (heads, getattr(cfg, "num_key_value_heads", None) or heads,
                     getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        if next(model.parameters()).is_cuda:
            fuse_projections(model)
        self.compiler = Compiler(name, compile)
        self._fn = self.compiler(self._forward)

    @property
    def compiled(self) -> bool:
        """Whether the pass runs compiled (after a compile failure: no)."""
        return self.compiler.enabled

    def logits(self, ids, lengths, prefix: list[tuple]):
        """ids [n, w] right-padded row tokens, lengths [n], prefix: per layer (keys, values) [1, kv, P, hd]."""
        return self._fn(ids, lengths, [k for k, _ in prefix], [v for _, v in prefix])

    def _forward(self, ids, lengths, prefix_k: list, prefix_v: list):
        import torch

        n, w = ids.shape
        start = prefix_k[0].shape[2]
        x = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(x, (start + torch.arange(w, device=ids.device))[None])

        def keys(l, k, v):
            return (torch.cat([prefix_k[l].expand(n, -1, -1, -1), k], dim=2),
                    torch.cat([prefix_v[l].expand(n, -1, -1, -1), v], dim=2))

        def attend(l, q, k, v, scale):
            return prefix_attention(q, k, v, prefix_k[l], prefix_v[l], scale)

        last = self.layers[-1]
        # the lean last layer is Llama's (Llama Guard's); other layouts (q/k norms, partial rotary, sandwich
        # norms) run the whole layer and keep the last tokens
        lean = not hasattr(last.self_attn, "q_norm") and not hasattr(last, "pre_feedforward_layernorm") \
            and cos.shape[-1] == self.dims[2]
        for layer in self.layers if not lean else self.layers[:-1]:
            x = decoder_layer(layer, x, cos, sin, lambda *a: None, attend, self.dims)
        if not lean:
            return self.head(self.base.norm(x[torch.arange(x.shape[0], device=x.device), lengths - 1])).float()
        return self.head(self._last_layer(last, x, cos, sin, lengths, keys)).float()

    def _last_layer(self, layer, x, cos, sin, lengths, keys):
        """The last layer for each row's last token only (keys and values for all); returns the final
        normed hidden state [n, D]."""
        import torch

        heads, kv_heads, head_dim = self.dims
        n, w, _ = x.shape
        attn = layer.self_attn
        # queries for every token too (fused with k/v, ~7% of this layer's FLOPs), then only the last kept
        q, k, v = project_qkv(attn, layer.input_layernorm(x), self.dims)
        k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
        k, v = keys(attn.layer_idx, k, v)
        rows, last = torch.arange(n, device=x.device), lengths - 1
        # One query per row, its q heads grouped by the KV head they read: [n, kv, heads/kv, hd].
        q = q[rows, :, last].reshape(n, kv_heads, heads // kv_heads, head_dim)
        qc, qs = cos[0, last][:, None, None], sin[0, last][:, None, None]
        q = q * qc + rotate_half(q) * qs
        # Written out rather than SDPA: a masked single-query SDPA goes to cuDNN on Hopper, which
        # plans every new shape on the host (~95 ms each, measured), and here all is small.
        start = k.shape[2] - w
        seen = torch.arange(k.shape[2], device=x.device)[None] < (start + lengths)[:, None]  # not the padding
        scores = (q @ k.transpose(-1, -2)).float() * attn.scaling
        scores = scores.masked_fill(~seen[:, None, None], float("-inf"))
        o = scores.softmax(-1).to(v.dtype) @ v
        x = x[rows, last] + attn.o_proj(o.reshape(n, heads * head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.base.norm(x)


def prefix_attention(q, k, v, prefix_k, prefix_v, scale):
    """Attention of q [n, H, T, hd] over a shared prefix's keys and values [1, KV, P, hd] and then, causally,
    each row's own k, v [n, KV, T, hd]: query t sees the whole prefix and its row's keys 0..t.

    Two softmaxes over disjoint keys, merged by their log-sum-exp (as split-K attention merges its ranges):
    with weight w = sigmoid(lse_prefix - lse_own), the result is w * o_prefix + (1 - w) * o_own. The prefix
    part reads all n * T queries as one sequence, so the prefix is neither expanded nor concatenated per row,
    and the own part is square, its causal mask the usual one."""
    import torch

    n, heads, t, hd = q.shape
    own, own_lse = attention_with_lse(q, k, v, scale, causal=True)
    if prefix_k.shape[2] == 0:
        return own
    flat = q.transpose(1, 2).reshape(1, n * t, heads, hd).transpose(1, 2)
    pre, pre_lse = attention_with_lse(flat, prefix_k, prefix_v, scale, causal=False)
    pre = pre.transpose(1, 2).reshape(n, t, heads, hd).transpose(1, 2)
    pre_lse = pre_lse.reshape(heads, n, t).transpose(0, 1)
    w = torch.sigmoid(pre_lse - own_lse)[..., None]
    return (own.float() + (pre.float() - own.float()) * w).to(q.dtype)


def attention_with_lse(q, k, v, scale, causal: bool):
    """(attention output [B, H, T, hd], its log-sum-exp [B, H, T] fp32) of q over k, v [B, KV, S, hd]
    (KV dividing H: grouped heads read as they are); ``causal`` needs S == T."""
    import torch

    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        t = q.shape[2]
        above = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).exp() @ v.float()).to(q.dtype), lse
