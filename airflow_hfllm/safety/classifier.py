"""Any sequence-classification model with safe/unsafe-like labels (``id2label``)."""

from __future__ import annotations

from typing import Sequence

from airflow_hfllm.config import HubOptions
from airflow_hfllm.engine.loading import get_model
from airflow_hfllm.config import ModelSpec
from airflow_hfllm.safety.base import Kind, SafetyChecker, Verdict, require_finite, windows

SAFE_LABELS = {"safe", "benign", "ok", "neutral", "normal", "clean", "sfw", "non-toxic", "non_toxic",
               "nontoxic", "not_toxic", "not-toxic", "non-hate", "nothate", "label_0"}


class ClassifierChecker(SafetyChecker):
    """:param model: hub id or folder of an ``AutoModelForSequenceClassification`` model.
    :param safe_labels: the labels that mean safe; by default those named like ``safe``/``benign``.
    :param threshold: a text is unsafe when the unsafe probability reaches this.
    """

    def __init__(self, model: str, *, revision: str | None = None, hub: HubOptions | None = None,
                 safe_labels: Sequence[str] | None = None, threshold: float = 0.5, batch_size: int = 32):
        self.spec = ModelSpec(model, revision=revision, task="classifier")
        self.hub = hub
        self.safe_labels = {s.lower() for s in safe_labels} if safe_labels else None
        self.threshold = threshold
        self.batch_size = batch_size
        self.name = f"classifier:{model}"

    def load(self):
        loaded = get_model(self.spec, self.hub)
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
        return loaded

    def check(self, texts: Sequence[str], kind: Kind, context=None) -> list[Verdict]:
        import torch

        loaded = self.load()
        tok, model = loaded.tokenizer, loaded.model
        inputs, owner = [], []
        for n, text in enumerate(texts):
            for window in windows(tok(text, add_special_tokens=False)["input_ids"], self._room):
                # decode + encode adds the model's own special tokens, whatever the tokenizer class
                inputs.append(tok(tok.decode(window), truncation=True, max_length=self._limit)["input_ids"])
                owner.append(n)
        probs = []
        for start in range(0, len(inputs), self.batch_size):
            batch = tok.pad({"input_ids": inputs[start:start + self.batch_size]}, return_tensors="pt")
            with torch.inference_mode():
                logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float()
            probs.append(logits.sigmoid() if self._multi_label else logits.softmax(-1))
        probs = torch.cat(probs).cpu()
        require_finite(probs, self.name)
        out = []
        for n in range(len(texts)):
            rows = probs[[i for i, o in enumerate(owner) if o == n]]
            if self._multi_label:
                score = rows[:, self._unsafe].max().item()
            else:
                score = (1 - rows[:, self._safe].sum(-1)).max().item()
            categories = tuple(
                self._labels[i] for i in self._unsafe if rows[:, i].max().item() >= self.threshold
            )
            out.append(Verdict(self.name, score < self.threshold, score, categories))
        return out

    def fingerprint(self) -> dict:
        return {"checker": "classifier", "model": self.spec.model, "revision": self.spec.revision,
                "threshold": self.threshold, "safe_labels": sorted(self.safe_labels or [])}
