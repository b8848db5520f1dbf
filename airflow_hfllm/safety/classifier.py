"""Any sequence-classification model with safe/unsafe-like labels (``id2label``).

Texts go in groups of ``batch_size``, shortest first by characters; a thread tokenizes the next group
while the GPU runs this one. A group's rows (texts, or windows of texts longer than the model's limit) are
sorted by tokens and run in passes of at most ``batch_size`` rows and ``token_budget`` padded tokens, so a
pass pads little; the verdicts come back in input order. The model runs in the load dtype (bf16 on GPU,
fp16 where bf16 is missing, fp32 on CPU) with the attention transformers picks for it (SDPA where the model
has it), except DeBERTa-v2/v3 (Prompt Guard's, eager only in transformers), whose disentangled attention
runs through one SDPA call (:mod:`~airflow_hfllm.safety.deberta`, ``fast=True``). A pass's ids go to the
device from pinned memory, queued behind the passes before it, and the scores come back in one copy after
the last: nothing waits on the GPU in between. On a GPU, for a run large enough to repay it
(``COMPILE_MIN_TEXTS``), the forward pass is compiled (``torch.compile``, dynamic shapes): its norms,
activations, the attention bias's gathers and the softmax become a few fused kernels instead of ~40 per
layer.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import nullcontext
from typing import Sequence

from airflow_hfllm.config import HubOptions
from airflow_hfllm.engine.arch.layer import padded_with_mask, upload
from airflow_hfllm.engine.loading import get_model
from airflow_hfllm.config import ModelSpec
from airflow_hfllm.safety.base import Kind, SafetyChecker, Verdict, batches, compiles, require_finite, windows

log = logging.getLogger(__name__)

SAFE_LABELS = {"safe", "benign", "ok", "neutral", "normal", "clean", "sfw", "non-toxic", "non_toxic",
               "nontoxic", "not_toxic", "not-toxic", "non-hate", "nothate", "label_0"}


class ClassifierChecker(SafetyChecker):
    """:param model: hub id or folder of an ``AutoModelForSequenceClassification`` model.
    :param safe_labels: the labels that mean safe; by default those named like ``safe``/``benign``.
    :param threshold: a text is unsafe when the unsafe probability reaches this.
    :param batch_size: most rows (texts or windows) per forward pass.
    :param token_budget: most rows x longest row (padded tokens) per forward pass.
    :param fast: DeBERTa-v2/v3 attention through SDPA (:mod:`~airflow_hfllm.safety.deberta`); ``False``:
        transformers' own. Other models take transformers' attention either way.
    :param compile: ``torch.compile`` the forward pass; by default on CUDA for a run that expects at least
        ``COMPILE_MIN_TEXTS`` texts (:meth:`expect`). A compile failure runs eager, with a warning.
    """

    def __init__(self, model: str, *, revision: str | None = None, hub: HubOptions | None = None,
                 safe_labels: Sequence[str] | None = None, threshold: float = 0.5, batch_size: int = 256,
                 token_budget: int = 32_768, fast: bool = True, compile: bool | None = None):
        self.spec = ModelSpec(model, revision=revision, task="classifier")
        self.hub = hub
        self.safe_labels = {s.lower() for s in safe_labels} if safe_labels else None
        self.threshold = threshold
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.fast = fast
        self.compile = compile
        self.name = f"classifier:{model}"
        self.stats: Counter = Counter()  # texts, rows, tokens (special tokens included): counts only
        self._loaded = None
        self._expected: int | None = None
        self.lean = False  # whether the DeBERTa attention runs through SDPA
        self.triton = False  # whether its bias is the Triton kernel's (safety/deberta_kernel.py)
        self.compiler = None

    def expect(self, texts: int) -> None:
        self._expected = texts

    def load(self):
        loaded = get_model(self.spec, self.hub)
        if self._loaded is loaded:
            return loaded
        labels = {int(k): str(v) for k, v in loaded.model.config.id2label.items()}
        wanted = self.safe_labels or SAFE_LABELS
        self._safe = [i for i, name in labels.items() if name.lower() in wanted]
        self._unsafe = [i for i in labels if i not in self._safe]
        if not self._safe or not self._unsafe:
            raise ValueError(
                f"cannot tell safe from unsafe labels of {self.spec.model}: id2label={labels}; "
                "pass safe_labels=[...]"
            )
        self._labels = labels
        self._multi_label = loaded.model.config.problem_type == "multi_label_classification"
        limit = getattr(loaded.tokenizer, "model_max_length", 512) or 512
        limit = min(limit, getattr(loaded.model.config, "max_position_embeddings", limit) or limit, 4096)
        self._limit = limit
        self._room = limit - len(loaded.tokenizer("")["input_ids"])  # minus the special tokens it adds
        from airflow_hfllm.safety.deberta import triton_attention, unsupported_reason

        from airflow_hfllm.engine.compiled import Compiler

        self.lean = self.fast and unsupported_reason(loaded.model) is None
        self.triton = self.lean and triton_attention(loaded.device) is not None
        self.compiler = Compiler(f"classifier {self.spec.model}",
                                 compiles(self.compile, self._expected, loaded.device.type))
        model = loaded.model
        self._forward = self.compiler(lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits.float())
        self._loaded = loaded
        return loaded

    def check(self, texts: Sequence[str], kind: Kind, context=None) -> list[Verdict]:
        import torch

        loaded = self.load()
        if not texts:
            return []
        texts = list(texts)
        while True:  # a failing fast attention steps down: Triton's bias, the gathered bias, transformers'
            try:
                owner, rows, probs = self._probs(loaded, texts)
                break
            except Exception as exc:
                if not self.lean or isinstance(exc, torch.OutOfMemoryError):
                    raise
                step = "the Triton DeBERTa bias" if self.triton else "the SDPA DeBERTa attention"
                log.warning("classifier %s: %s failed (%s: %s); %s from now on", self.spec.model, step,
                            type(exc).__name__, str(exc)[:200],
                            "the gathered bias" if self.triton else "transformers' attention")
                if self.triton:
                    self.triton = False
                else:
                    self.lean = False
        self.stats.update(texts=len(texts), rows=len(rows), tokens=sum(map(len, rows)))
        require_finite(probs, self.name)
        if self._multi_label:
            row_scores = probs[:, self._unsafe].max(-1).values
        else:
            row_scores = 1 - probs[:, self._safe].sum(-1)
        # a text's score and label probabilities: the highest over its windows
        index = torch.tensor(owner)
        scores = row_scores.new_zeros(len(texts)).scatter_reduce(0, index, row_scores, "amax", include_self=False)
        per_label = probs.new_zeros(len(texts), probs.shape[1]).scatter_reduce(
            0, index[:, None].expand_as(probs), probs, "amax", include_self=False)
        flagged = (per_label >= self.threshold).tolist()
        return [Verdict(self.name, score < self.threshold, score,
                        tuple(self._labels[i] for i in self._unsafe if flagged[n][i]))
                for n, score in enumerate(scores.tolist())]

    def _rows(self, tok, texts: list[str]) -> tuple[list[int], list[list[int]]]:
        """Token ids (with the model's special tokens) of each row to judge, and the text each belongs
        to: one row per text, or one per window of a text longer than the model's limit."""
        owner, rows = [], []
        for n, ids in enumerate(tok(texts)["input_ids"]):  # one batched call: the fast tokenizers' threads
            if len(ids) <= self._limit:
                owner.append(n)
                rows.append(ids)
                continue
            for window in windows(tok(texts[n], add_special_tokens=False)["input_ids"], self._room):
                # decode + encode adds the model's own special tokens, whatever the tokenizer class
                owner.append(n)
                rows.append(tok(tok.decode(window), truncation=True, max_length=self._limit)["input_ids"])
        return owner, rows

    def _probs(self, loaded, texts: list[str]):
        """(the text of each row, each row's token ids, their label probabilities [rows, labels] fp32 on the
        CPU), the texts grouped and tokenized as the module's docstring says."""
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from airflow_hfllm.safety.deberta import lean_attention

        tok = loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        left = getattr(tok, "padding_side", "right") == "left"
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        groups = [order[at:at + self.batch_size] for at in range(0, len(order), self.batch_size)]
        owner, rows, out, ran = [], [], [], []
        with ThreadPoolExecutor(1) as pool, torch.inference_mode(), \
                lean_attention(loaded.model, self.triton) if self.lean else nullcontext():
            # the tokenizer's Rust code runs without the GIL, beside this thread's launches
            tokenized = pool.map(lambda group: self._rows(tok, [texts[i] for i in group]), groups)
            for group, (own, ids) in zip(groups, tokenized):
                first = len(rows)
                owner += [group[n] for n in own]
                rows += ids
                by_length = sorted(range(len(ids)), key=lambda i: len(ids[i]))
                for batch in batches(by_length, ids, self.batch_size, self.token_budget):
                    host_ids, mask = padded_with_mask([ids[i] for i in batch], pad, left)
                    logits = self._forward(upload(host_ids, loaded.device), upload(mask, loaded.device).long())
                    out.append(logits.sigmoid() if self._multi_label else logits.softmax(-1))
                    ran += [first + i for i in batch]
            probs = torch.empty(len(rows), len(self._labels))
            probs[ran] = torch.cat(out).cpu()
        return owner, rows, probs

    @property
    def compiled(self) -> bool:
        """Whether passes run compiled (after a compile failure: no)."""
        return bool(self.compiler and self.compiler.enabled)

    def fingerprint(self) -> dict:
        return {"checker": "classifier", "model": self.spec.model, "revision": self.spec.revision,
                "threshold": self.threshold, "safe_labels": sorted(self.safe_labels or [])}
