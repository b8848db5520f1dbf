"""Log-probabilities of the generated tokens (``logprobs=K``): each token's own and the K likeliest at its
step, from the model's raw logits (log-softmax before penalties, temperature, top-k and top-p), so they
describe the model and not the sampling settings. :func:`pick` runs on the device for both engines;
:class:`SlotLogprobs` holds the fast engine's per-slot record; :class:`Columns` turns a row's record into
its ``output_logprob`` and ``top_logprobs`` values."""

from __future__ import annotations


def pick(logits, chosen, k: int):
    """(chosen tokens' log-probabilities [n], top-k log-probabilities [n, k], their ids [n, k]) from raw
    logits [n, V] and the tokens drawn [n]. float32: a bfloat16 log-softmax is off by ~0.01."""
    lp = logits.float().log_softmax(-1)
    own = lp.gather(-1, chosen[:, None])[:, 0]
    if not k:  # no empty top-k kernel in the CUDA graph
        return own, lp[:, :0], chosen[:, None][:, :0].int()
    top = lp.topk(k, dim=-1)
    return own, top.values, top.indices.int()


def steps_record(logits, generated, k: int) -> list[tuple]:
    """Each row's record (as :meth:`SlotLogprobs.read`) from ``generate()``'s raw logits, one [n, V] per step,
    and its generated ids [n, steps]; steps after a row's EOS are padding, cut with its output."""
    import torch

    picked = [pick(step, generated[:, t], k) for t, step in enumerate(logits)]
    chosen, values, ids = (torch.stack(part, 1).tolist() for part in zip(*picked))
    return list(zip(chosen, values, ids))


class SlotLogprobs:
    """The fast engine's record, beside its output ids: [slots, max_len] and [slots, max_len, K] tensors
    written in place by the decode steps (inside the CUDA graph: no host sync) and read with the ids."""

    def __init__(self, k: int, slots: int, max_len: int, device):
        import torch

        self.k = k
        self.chosen = torch.zeros((slots, max_len), device=device)
        self.values = torch.zeros((slots, max_len, k), device=device)
        self.ids = torch.zeros((slots, max_len, k), dtype=torch.int32, device=device)

    @staticmethod
    def bytes_per_token(k: int | None) -> int:
        return 0 if k is None else 4 + 8 * k

    def record(self, logits, chosen, slots, col, live=None) -> None:
        """Step ``col`` [n] of rows in ``slots`` [n] drew ``chosen`` [n] from ``logits`` [n, V]; rows not
        ``live`` keep what they had."""
        import torch

        own, values, ids = pick(logits, chosen, self.k)
        if live is not None:
            own = torch.where(live, own, self.chosen[slots, col])
            values = torch.where(live[:, None], values, self.values[slots, col])
            ids = torch.where(live[:, None], ids, self.ids[slots, col])
        self.chosen[slots, col] = own
        self.values[slots, col] = values
        self.ids[slots, col] = ids

    def read(self, slots: list[int], width: int) -> list[tuple]:
        """Each slot's first ``width`` steps as host lists (chosen, top values, top ids)."""
        chosen = self.chosen[slots, :width].tolist()
        values = self.values[slots, :width].tolist()
        ids = self.ids[slots, :width].tolist()
        return list(zip(chosen, values, ids))


class Columns:
    """A row's output columns from its record: tokens decoded one id at a time (a token that is part of a
    multi-byte character reads as U+FFFD, as OpenAI's do), each id decoded once per job."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, {}

    def text(self, token: int) -> str:
        if token not in self.texts:
            self.texts[token] = self.tokenizer.decode([token])
        return self.texts[token]

    def __call__(self, ids: list[int], record: tuple | None) -> tuple[float | None, list | None]:
        """(``output_logprob``, ``top_logprobs``) over the output's tokens ``ids``: the record's first
        ``len(ids)`` steps (an EOS that ended the row is not part of the output, nor of its sum)."""
        if record is None:
            return None, None
        chosen, values, top_ids = (part[:len(ids)] for part in record)
        tokens = [{"id": t, "token": self.text(t), "logprob": lp,
                   "top": [{"id": a, "token": self.text(a), "logprob": v} for a, v in zip(alt_ids, alt_values)]}
                  for t, lp, alt_values, alt_ids in zip(ids, chosen, values, top_ids)]
        return float(sum(chosen)), tokens
