"""LongRoPE (``rope_type: longrope``: Phi-3.5, Phi-4-mini) per row, as transformers' generate() runs it
one row at a time.

transformers picks one of two frequency sets per forward pass: the long factors when the pass's last
position + 1 exceeds ``original_max_position_embeddings``, else the short ones (the attention factor
scales both). And Phi-3's ``prepare_inputs_for_generation`` drops the KV cache at the step that first
passes that length: that step runs the row's whole sequence again, on the long factors, so the cache
holds long-factor keys and values only from then on. The fast engine does the same per row:

- :class:`LongRope` gives the tables of each row's own factors: a prefill row's by its length (not the
  padded width), a decode row's by its position; the long and short frequencies are computed once, from
  the rotary module's buffers and config (its forward would pick them by a ``max`` over the batch);
- a row whose next decode step is the first past the original context does not advance in the decode
  steps (:meth:`LongRope.waits`: the CUDA graph holds that mask, no host sync); before the next steps,
  with the prefills, :func:`recompute` prefills its prompt and generated tokens again (on the long
  factors) into its slot and takes that step from the pass's last logits, as a prefill takes a row's
  first token (a grammar's matcher consumes it there).
"""

from __future__ import annotations

from airflow_hfllm.engine.arch.layer import rope_parameters


def is_longrope(config) -> bool:
    rope = rope_parameters(config)
    return rope.get("rope_type", rope.get("type")) == "longrope"


class LongRope:
    """cos, sin [n, T, rotary_dim] for positions [n, T], each row on its own factors."""

    def __init__(self, rotary):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        self.original = rotary.config.rope_parameters["original_max_position_embeddings"]
        short = rotary.original_inv_freq  # rotary.inv_freq is the set its last forward switched to
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](rotary.config, short.device, seq_len=self.original + 1)
        self.short, self.long, self.scaling = short.float(), long.float().to(short.device), rotary.attention_scaling

    @classmethod
    def of(cls, rotary) -> LongRope | None:
        return cls(rotary) if getattr(rotary, "rope_type", None) == "longrope" else None

    def __call__(self, x, positions, lengths=None):
        """``lengths`` [n]: a right-padded prefill's row lengths (else each row's last column is its last)."""
        import torch

        last = positions[:, -1] if lengths is None else positions.gather(1, lengths[:, None] - 1)[:, 0]
        inv_freq = torch.where((last + 1 > self.original)[:, None], self.long, self.short)
        freqs = positions[..., None].float() * inv_freq[:, None, :]  # as the model's forward, row by row
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(x.dtype), (emb.sin() * self.scaling).to(x.dtype)

    def waits(self, positions):
        """[slots] bool: rows whose decode step at ``positions`` would be the first past the original
        context; :func:`recompute` takes that step for them."""
        return positions == self.original


def recompute(engine, sched) -> None:
    """The step of each live row of ``engine`` (a FastEngine) that waits at the original context, through
    a prefill of its prompt and generated tokens on the long factors (generate()'s recompute of its KV
    cache), in groups of at most ``engine.prefill_tokens`` tokens. Nothing for other models."""
    import torch

    from airflow_hfllm.engine.arch.layer import prefill_attention, padded

    rope = engine.decoder.longrope
    if rope is None:
        return
    rows = {s: row.request for s, row in enumerate(sched.slots) if row is not None}
    # a row waits only if its prompt is within the original context and its output may pass it: else no sync
    if not any(len(r.input_ids) <= rope.original < len(r.input_ids) + r.max_new_tokens - 1 for r in rows.values()):
        return
    waiting = (rope.waits(engine.pos + engine.rope_offset) & ~engine.done).nonzero()[:, 0].tolist()
    per_group = max(1, engine.prefill_tokens // (rope.original + 1))
    for start in range(0, len(waiting), per_group):
        slots = waiting[start:start + per_group]
        generated, counts = engine.out[slots].tolist(), engine.n_gen[slots].tolist()
        ids = padded([rows[s].input_ids + out[:n] for s, out, n in zip(slots, generated, counts)])
        ids, slot_idx = ids.to(engine.device), torch.tensor(slots, device=engine.device)
        n, width = ids.shape  # all rows of original + 1 tokens
        with prefill_attention():
            last = engine.decoder.prefill(engine.k_cache, engine.v_cache, engine.base.embed_tokens(ids),
                                          torch.arange(width, device=engine.device).expand(n, width),
                                          torch.full((n,), width, device=engine.device), slot_idx, table=engine.table)
        logits = torch.zeros(len(engine.done), last.shape[-1], dtype=last.dtype, device=engine.device)
        logits[slot_idx] = last
        live = torch.zeros_like(engine.done)
        live[slot_idx] = True
        engine.advance(logits, live)
        if engine.constraint:
            engine.constraint.admitted(slots, engine.tokens, engine.done, engine.n_gen)
