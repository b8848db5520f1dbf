"""Each choice's log-probability after a row's prompt (``choices`` with ``logprobs``): the standard way to
use an LLM as a classifier with a score.

A choice's score is the sum of its tokens' raw log-probabilities (log-softmax of the model's logits, no
temperature, no grammar mask) given the prompt and the choice's earlier tokens; not normalised over the
choices, so a long choice is not favoured or penalised beyond what the model says. The choices are scored
by teacher forcing, one forward pass over ``prompt + choice`` for every (row, choice) pair, whichever
choice the row generated: the cost is about ``len(choices)`` prefills of the prompt, on top of generation.
"""

from __future__ import annotations

from typing import Sequence


class ChoiceScorer:
    """Scores ``choices`` after prompts with ``loaded``'s model, in batches of at most ``token_budget``
    tokens (rows x longest sequence)."""

    def __init__(self, loaded, choices: Sequence[str], token_budget: int = 16_384):
        self.model, self.names = loaded.model, list(choices)
        # as the model writes them after the prompt: no special tokens
        self.tokens = [loaded.tokenizer.encode(c, add_special_tokens=False) for c in self.names]
        self.token_budget = token_budget

    def __call__(self, prompts: list[list[int]]) -> list[list[dict]]:
        """For each prompt, ``[{"choice": name, "logprob": total}]`` in the order of the choices."""
        pairs = [(p, c) for p in range(len(prompts)) for c in range(len(self.names))]
        pairs.sort(key=lambda pc: -len(prompts[pc[0]]))  # similar lengths together: less padding
        scores: list[list[float]] = [[0.0] * len(self.names) for _ in prompts]
        batch: list[tuple[int, int]] = []
        for pair in pairs:
            width = max(len(prompts[p]) + len(self.tokens[c]) for p, c in [*batch, pair])
            if batch and width * (len(batch) + 1) > self.token_budget:
                self._score(prompts, batch, scores)
                batch = []
            batch.append(pair)
        if batch:
            self._score(prompts, batch, scores)
        return [[{"choice": name, "logprob": s} for name, s in zip(self.names, row)] for row in scores]

    def _score(self, prompts, batch, scores) -> None:
        import torch

        from airflow_hfllm.engine.arch.layer import padded_with_mask

        device = next(self.model.parameters()).device
        ids, mask = padded_with_mask([prompts[p] + self.tokens[c] for p, c in batch])
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits
        for row, (p, c) in enumerate(batch):
            start, choice = len(prompts[p]), self.tokens[c]
            # the logits at position t predict token t + 1
            step = logits[row, start - 1:start - 1 + len(choice)].float().log_softmax(-1)
            scores[p][c] = float(step.gather(-1, torch.tensor(choice, device=device)[:, None]).sum())
