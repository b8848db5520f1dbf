"""Salesforce ``safety-flan-t5-base`` style checker (the seed's), batched.

The model reads ``"Is the <Text> field safe or unsafe? <Text> {text} <Context> "`` and answers
``safe`` or ``unsafe``; after ``unsafe`` it spells out ``category true|false`` pairs whose
true/false scores at decoder steps 3, 5, ..., 17 are the category scores. The verdict is the first
token, so it comes from one forward pass over the first-token logits (its probability is the score);
only unsafe texts run the 20-step ``generate()`` for categories. Outputs are judged alone: the seed
re-checked prompt + output as one text and overflowed T5's 512 tokens. Long texts are split into
windows, unsafe if any window is.
"""

from __future__ import annotations

from typing import Sequence

from airflow_hfllm.config import HubOptions
from airflow_hfllm.engine.loading import get_model
from airflow_hfllm.config import ModelSpec
from airflow_hfllm.safety.base import Kind, SafetyChecker, Verdict, require_finite, windows

DEFAULT_MODEL = "Salesforce/safety-flan-t5-base"
CATEGORIES = ("toxicity", "hate", "identity", "violence", "physical", "sexual", "profanity", "biased")
PREFIX = "Is the <Text> field safe or unsafe? <Text> "
SUFFIX = " <Context> "


class SalesforceChecker(SafetyChecker):
    """:param model: hub id or folder of a seq2seq safety model in this format.
    :param batch_size: texts (windows) per forward pass.
    :param max_length: encoder length limit; longer texts are checked in windows.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, revision: str | None = None, hub: HubOptions | None = None,
                 batch_size: int = 32, max_length: int = 512):
        self.spec = ModelSpec(model, revision=revision, task="seq2seq")
        self.hub = hub
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = f"salesforce:{model}"

    def load(self):
        loaded = get_model(self.spec, self.hub)
        tok = loaded.tokenizer
        word = lambda w: tok(" " + w, add_special_tokens=False)["input_ids"][0]  # noqa: E731
        self._verdict_ids = (word("safe"), word("unsafe"))
        self._true_false_ids = (word("true"), word("false"))
        self._prefix = tok(PREFIX, add_special_tokens=False)["input_ids"]
        self._suffix = tok(SUFFIX, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return loaded

    def check(self, texts: Sequence[str], kind: Kind, context=None) -> list[Verdict]:
        loaded = self.load()
        tok = loaded.tokenizer
        room = self.max_length - len(self._prefix) - len(self._suffix)
        inputs, owner = [], []
        for n, text in enumerate(texts):
            for window in windows(tok(text, add_special_tokens=False)["input_ids"], room):
                inputs.append(self._prefix + window + self._suffix)
                owner.append(n)
        judged = []
        for start in range(0, len(inputs), self.batch_size):
            judged.extend(self._judge(loaded, inputs[start:start + self.batch_size]))
        per_text: list[list[tuple[bool, float, tuple]]] = [[] for _ in texts]
        for n, result in zip(owner, judged):
            per_text[n].append(result)
        out = []
        for results in per_text:
            safe = all(r[0] for r in results)
            categories = tuple(c for c in CATEGORIES if any(c in r[2] for r in results))
            out.append(Verdict(self.name, safe, max(r[1] for r in results), categories))
        return out

    def _judge(self, loaded, inputs: list[list[int]]) -> list[tuple[bool, float, tuple]]:
        import torch

        model, tok = loaded.model, loaded.tokenizer
        width = max(len(i) for i in inputs)
        ids = torch.full((len(inputs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for n, row in enumerate(inputs):
            ids[n, :len(row)] = torch.tensor(row)
            mask[n, :len(row)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        start = torch.full((len(inputs), 1), model.config.decoder_start_token_id, device=model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0].float()
        safe_id, unsafe_id = self._verdict_ids
        require_finite(logits[:, [safe_id, unsafe_id]], self.name)
        # The seed's rule: safe only when the first generated word is "safe".
        safe = (logits.argmax(-1) == safe_id).tolist()
        score = logits[:, [safe_id, unsafe_id]].softmax(-1)[:, 1].tolist()
        categories = [()] * len(inputs)
        unsafe_rows = [n for n, s in enumerate(safe) if not s]
        if unsafe_rows:
            with torch.inference_mode():
                gen = model.generate(input_ids=ids[unsafe_rows], attention_mask=mask[unsafe_rows], max_new_tokens=20,
                                     do_sample=False, output_scores=True, return_dict_in_generate=True)
            for k, n in enumerate(unsafe_rows):
                found = []
                for name, step in zip(CATEGORIES, range(3, 20, 2)):
                    if step < len(gen.scores):
                        p_true = gen.scores[step][k, list(self._true_false_ids)].float().softmax(-1)[0].item()
                        if p_true > 0.5:
                            found.append(name)
                categories[n] = tuple(found)
        return [(s, sc, c) for s, sc, c in zip(safe, score, categories)]

    def fingerprint(self) -> dict:
        return {"checker": "salesforce", "model": self.spec.model, "revision": self.spec.revision,
                "max_length": self.max_length}
