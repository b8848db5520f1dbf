"""Random weights for the tiny models that give long, varied, tie-free greedy replies.

Default init (std 0.02) gives near-uniform attention and tiny logits: every reply is the same token or
EOS. Unit-std embeddings/lm_head (:data:`STD`) spread logits far apart (no near-ties, so batched ==
single greedy), sharper attention makes the next token depend on the prompt and not only on the shared
``"<|im_start|>assistant\\n"`` tail. lm_head keeps only " word" rows (:func:`only_words`), and the EOS row
is scaled (:func:`scale_eos`) so that only a few replies stop early.
"""

from __future__ import annotations

STD = {"embed_tokens": 1.0, "lm_head": 1.0, "q_proj": 0.3, "k_proj": 0.3, "v_proj": 0.3, "qkv_proj": 0.3,
       "o_proj": 0.3}
STD_MLP = 0.15  # every other matrix of the language model (the MLP)
EOS_STOP_FRACTION = 0.03


def only_words(head, tok, keep=()) -> None:
    """Zero the lm_head rows of all but " word" tokens.

    A zero row scores 0, far below the best of ~500 random logits, so it is never
    picked: outputs are space-separated words (``text.split()[0]`` is the first
    generated token) instead of byte soup and half-words.
    """
    words = (i for t, i in tok.get_vocab().items() if t[:1] == "\u0120" and t[1:].isascii() and t[1:].isalpha())
    keep = [*keep, *words]
    mask = head.new_ones(head.shape[0], dtype=bool)
    mask[keep] = False
    head[mask] = 0


def scale_eos(model, step_logits, eos: int) -> None:
    """Scale the EOS row of lm_head so that ~:data:`EOS_STOP_FRACTION` of greedy replies stop early.

    ``step_logits``: the raw logits (EOS included) of greedy generations run with EOS suppressed, one
    tensor per step. How often a random row wins the argmax depends a lot on the seed (and on the
    model's own outputs), so it is measured on generations instead of guessed.
    """
    import torch

    logits = torch.stack(step_logits, dim=1)  # (batch, steps, vocab)
    eos_logit = logits[..., eos].clone()
    logits[..., eos] = float("-inf")
    # With the row scaled by alpha, EOS wins a step where alpha > best / eos_logit.
    need = (logits.max(-1).values / eos_logit).where(eos_logit > 0, float("inf"))
    per_reply = need.min(dim=1).values.sort().values
    alpha = per_reply[int(EOS_STOP_FRACTION * len(per_reply))]
    if torch.isfinite(alpha):  # else EOS never scored above 0: leave it rare as it is
        model.lm_head.weight[eos] *= alpha
