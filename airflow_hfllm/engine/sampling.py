"""Sampling on the device for the fast engine: a row's seed from (job seed, row id), a counter-based hash of
(row seed, step, token) as the random source, so a row's sample depends on neither its batch nor any RNG
state, and :class:`Sampler`. The presence and frequency penalties are here too, shared with ``generate()``."""

from __future__ import annotations

MASK64 = (1 << 63) - 1


def row_seed(seed: int, key) -> int:
    """A 63-bit seed for one row, from the job seed and the row's id."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") & MASK64


def mix(x):
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic): a counter-based hash."""
    x = x ^ (x >> 31 & 0x1FFFFFFFF)
    x = x * -7723592293110705685  # 0x94D049BB133111EB as int64
    x = x ^ (x >> 29 & 0x7FFFFFFFF)
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
    x = x ^ (x >> 32 & 0xFFFFFFFF)
    return x


def penalise(logits, counts, presence: float, frequency: float):
    """OpenAI's presence and frequency penalties on logits [n, V], ``counts`` [n, V] being how often each row
    has generated each token (its prompt does not count, as in OpenAI's API and vLLM)."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


class Sampler:
    """Next tokens [n] from logits [n, V] on the device, in vLLM's order: repetition penalty, presence and
    frequency penalties, temperature, top-k, top-p, then a draw (or argmax when greedy). The draw is
    Gumbel-max with :func:`mix` of (row seed, step, token): no RNG state, no host sync."""

    def __init__(self, params, vocab: int, eos: list[int], device):
        import torch

        self.params, self.vocab = params, vocab
        self.tokens = torch.arange(vocab, device=device)
        self.eos = torch.isin(self.tokens, torch.tensor(eos, device=device)) if eos else None

    def __call__(self, logits, seeds, step, counts=None, presence=None, mask=None):
        """``step`` [n]: the index of the token being drawn; ``counts`` [n, V]: the tokens each row generated;
        ``presence`` [n, V]: the tokens in each row's prompt and output (repetition penalty); ``mask``
        [n, V / 32]: the bitmask of the tokens each row's grammar allows (``engine/grammar.py``)."""
        p = self.params
        if mask is not None:
            from airflow_hfllm.engine.grammar import apply_mask

            logits = apply_mask(logits, mask)
        logits = self.penalties(logits, counts, presence)
        if p.min_length and self.eos is not None:
            logits = logits.masked_fill((step < p.min_length)[:, None] & self.eos[None, :], float("-inf"))
        if not p.do_sample:
            return logits.argmax(-1)
        return self.draw(self.top_p(self.top_k(logits / p.temperature)), seeds, step)

    def penalties(self, logits, counts, presence):
        import torch

        p = self.params
        if presence is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(presence, penalised, logits)
        if counts is not None:
            logits = penalise(logits, counts, p.presence_penalty, p.frequency_penalty)
        return logits

    def top_k(self, logits):
        import torch

        k = self.params.top_k
        if not k or k >= self.vocab:
            return logits
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, float("-inf"))

    def top_p(self, logits):
        import torch

        if self.params.top_p >= 1.0:
            return logits
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = (cum - sorted_logits.softmax(-1)) > self.params.top_p  # keep the token that crosses top_p
        return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))

    def draw(self, logits, seeds, step):
        import torch

        x = mix(seeds[:, None] ^ mix(step[:, None] * 1_000_003 + self.tokens[None, :] + 1))
        u = ((x >> 11) & ((1 << 52) - 1)).double().add(0.5).div(float(1 << 52)).float()
        # u can round to 1.0 in float32, making the noise +inf: a -inf logit (top-k, top-p, a grammar's mask)
        # would then be NaN, which argmax picks
        noisy = logits - torch.log(-torch.log(u))
        return noisy.masked_fill(torch.isneginf(logits), float("-inf")).argmax(-1)
