"""A word/phrase blocklist: no model, exact and cheap; useful beside a model checker."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from airflow_hfllm.safety.base import Kind, SafetyChecker, Verdict


class BlocklistChecker(SafetyChecker):
    """:param terms: words or phrases (matched case-insensitively on word boundaries), or the path
        of a text file with one term per line (``#`` starts a comment).
    :param category: the category a match reports.
    """

    def __init__(self, terms: Sequence[str] | str, category: str = "blocklist"):
        self.source = str(terms) if isinstance(terms, (str, Path)) else None
        if isinstance(terms, (str, Path)):
            lines = Path(terms).read_text(encoding="utf-8").splitlines()
            terms = [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
        self.terms = sorted({t.lower() for t in terms})
        if not self.terms:
            raise ValueError("blocklist is empty")
        self.category = category
        self.name = "blocklist"
        self._pattern = re.compile(r"\b(?:" + "|".join(re.escape(t) for t in self.terms) + r")\b", re.I)

    def check(self, texts, kind: Kind, context=None) -> list[Verdict]:
        out = []
        for text in texts:
            hit = self._pattern.search(text) is not None
            out.append(Verdict(self.name, not hit, 1.0 if hit else 0.0, (self.category,) if hit else ()))
        return out

    def fingerprint(self) -> dict:
        return {"checker": self.name, "terms": self.terms, "category": self.category}

    def describe(self) -> dict:
        # The terms are often what the job must not show (slurs, names, secrets): name the list only.
        return {"checker": self.name, "category": self.category, "terms": len(self.terms), "source": self.source}
