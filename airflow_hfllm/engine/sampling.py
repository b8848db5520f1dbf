"""The fast engine's random source: a row's seed from (job seed, row id), and a counter-based hash of
(row seed, step, token), so a row's sample depends on neither its batch nor any RNG state. And the
presence and frequency penalties, shared by the fast engine and ``generate()``."""

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
