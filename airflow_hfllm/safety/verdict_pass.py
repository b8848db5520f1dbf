"""The verdict of a causal-LM checker in one lean forward pass over its own modules.

A Llama Guard check reads a shared prefix (KV cached once), the row's own tokens, and needs only the
next-token logits at each row's last token. transformers' forward pads rows on the left, so every
layer builds a per-row padding mask, attention falls back to the masked memory-efficient kernel, and
the prefix cache is concatenated through ``DynamicCache``. Here instead:

- rows are padded on the *right*: under causal attention a real token never sees the padding after
  it, so no mask is needed and all rows share positions ``prefix + 0..w-1``;
- attention is flash attention with the causal diagonal aligned to the bottom right (queries are the
  last ``w`` of ``prefix + w`` keys), on the prefix keys concatenated with the row's;
- the last layer projects keys and values for every token but runs its query, attention output and
  MLP for each row's last token only (the only one whose logits are read): about 1/layers of the
  pass's matmul FLOPs saved.

Supports what the fast engine supports (Llama/Qwen2/Mistral-style decoders, unquantized or FP8); anything
else keeps transformers' forward (:meth:`LlamaGuardChecker._run`).
"""

from __future__ import annotations

from airflow_hfllm.engine.arch.layer import decoder_layer, rotate_half, text_config, text_model
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
        self.gqa = bool(self.dims[1] != heads)
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
            return causal_attention(q, *keys(l, k, v), scale, self.gqa)

        last = self.layers[-1]
        attn = last.self_attn
        # the lean last layer is Llama's (Llama Guard's); other layouts (q/k norms, fused q/k/v, partial rotary,
        # sandwich norms) run the whole layer and keep the last tokens
        lean = hasattr(attn, "k_proj") and not hasattr(attn, "q_norm") \
            and not hasattr(last, "pre_feedforward_layernorm") and cos.shape[-1] == self.dims[2]
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
        h = layer.input_layernorm(x)
        cos4, sin4 = cos.unsqueeze(1), sin.unsqueeze(1)
        k = attn.k_proj(h).view(n, w, kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(n, w, kv_heads, head_dim).transpose(1, 2)
        k = k * cos4 + rotate_half(k) * sin4
        k, v = keys(attn.layer_idx, k, v)
        rows, last = torch.arange(n, device=x.device), lengths - 1
        # One query per row, its q heads grouped by the KV head they read: [n, kv, heads/kv, hd].
        q = attn.q_proj(h[rows, last]).view(n, kv_heads, heads // kv_heads, head_dim)
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


def causal_attention(q, k, v, scale, gqa: bool):
    """Causal attention of q [n, H, T, hd] over k, v [n, KV, S, hd], S >= T, the queries being the
    last T keys' positions (the diagonal aligned bottom right)."""
    import torch
    import torch.nn.functional as F

    t, s = q.shape[2], k.shape[2]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # flash attention's own causal mask is bottom-right aligned when S > T (SDPA's is_causal is
        # top-left there, so it is called directly); it reads grouped KV heads as they are.
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[0]
    mask = torch.arange(s, device=q.device)[None] <= torch.arange(t, device=q.device)[:, None] + (s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
