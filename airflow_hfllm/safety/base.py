"""The safety-checker interface and running several checkers over a batch of texts."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

log = logging.getLogger(__name__)

Kind = Literal["prompt", "output"]

# Texts a run must have for compiling a model checker (Llama Guard's pass, a classifier) to pay, when its
# ``compile`` is left to the default: Llama Guard's compile took 40-90 s per process on an H100/H200
# (inductor's disk cache warm / cold) and saved ~0.45 s per 1,024 checks of the standard batch
# (docs/benchmarks.md), so it pays from ~100k rows.
COMPILE_MIN_TEXTS = 200_000


def compiles(compile: bool | None, expected: int | None, device_type: str) -> bool:
    """Whether a checker compiles its model: as ``compile`` says, else on CUDA for a run expecting
    (:meth:`SafetyChecker.expect`) at least ``COMPILE_MIN_TEXTS`` texts, or not saying."""
    if compile is not None:
        return compile
    return device_type == "cuda" and (expected is None or expected >= COMPILE_MIN_TEXTS)


@dataclass(frozen=True)
class Verdict:
    """One checker's judgement of one text. ``score`` is the probability of unsafe, when known."""

    checker: str
    safe: bool
    score: float | None = None
    categories: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["categories"] = list(self.categories)
        return d


class SafetyChecker(ABC):
    """Judges texts in batches. Subclasses load their model lazily, through the model cache.

    ``check(texts, kind, context)`` returns one :class:`Verdict` per text; for output checks
    ``context`` holds the prompts the outputs answer. Raise to say a batch could not be judged:
    the rows are then retried one by one, and those that still fail become ``error`` rows, never safe.
    """

    name: str = "checker"

    def load(self) -> None:
        """Load models up front, so a checker that cannot load fails the job before any work."""

    def expect(self, texts: int) -> None:
        """How many texts (prompts and outputs) this run will give :meth:`check`, said before
        :meth:`load`: a checker may size its setup by it."""

    @abstractmethod
    def check(self, texts: Sequence[str], kind: Kind, context: Sequence[str] | None = None) -> list[Verdict]:
        ...

    def fingerprint(self) -> dict:
        """What changes verdicts: part of the job fingerprint (hashed, never shown)."""
        return {"checker": self.name}

    def describe(self) -> dict:
        """What the manifest (and so XCom, the UI and lineage) shows of this checker: nothing a
        checker keeps private, such as a blocklist's terms."""
        return self.fingerprint()


@dataclass
class Judgement:
    """All checkers' verdicts for one text, or the error that kept it from being judged."""

    verdicts: list[Verdict] = field(default_factory=list)
    error: str | None = None

    @property
    def safe(self) -> bool | None:
        if self.error is not None or not self.verdicts:
            return None
        return all(v.safe for v in self.verdicts)


def judge(
    checkers: Sequence[SafetyChecker],
    texts: Sequence[str],
    kind: Kind,
    context: Sequence[str] | None = None,
) -> list[Judgement]:
    """Run every checker over ``texts``; a text is unsafe if any checker says so."""
    results = [Judgement() for _ in texts]
    if not texts:
        return results
    for checker in checkers:
        verdicts = _check_isolating_failures(checker, texts, kind, context)
        for judgement, verdict in zip(results, verdicts):
            if isinstance(verdict, Verdict):
                judgement.verdicts.append(verdict)
            elif judgement.error is None:
                judgement.error = verdict
    for judgement in results:
        if judgement.error is not None:
            judgement.verdicts = []
    return results


def _check_isolating_failures(checker, texts, kind, context) -> list[Verdict | str]:
    try:
        verdicts = checker.check(list(texts), kind, list(context) if context is not None else None)
        if len(verdicts) != len(texts):
            raise RuntimeError(f"returned {len(verdicts)} verdicts for {len(texts)} texts")
        return verdicts
    except Exception as exc:
        if len(texts) == 1:
            log.warning("safety checker %s failed on one %s: %s", checker.name, kind, type(exc).__name__)
            return [f"safety checker {checker.name} failed: {type(exc).__name__}: {exc}"]
        log.warning("safety checker %s failed on a batch of %d; retrying row by row", checker.name, len(texts))
    out = []
    for n, text in enumerate(texts):
        ctx = [context[n]] if context is not None else None
        out.extend(_check_isolating_failures(checker, [text], kind, ctx))
    return out


def require_finite(scores, checker: str) -> None:
    """Raise when a model's scores hold NaN/inf (fp16 overflow, broken weights): a NaN compares
    false against every threshold and would pass as safe; raising makes the rows ``error`` instead."""
    import torch

    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError(f"{checker} produced non-finite scores")


def batches(order: list[int], rows: list[list[int]], batch_size: int, token_budget: int):
    """Runs of ``order`` (indices into ``rows``, best sorted by length) of at most ``batch_size`` rows and
    ``token_budget`` tokens once padded to the run's longest row."""
    batch, width = [], 0
    for i in order:
        wider = max(width, len(rows[i]))
        if batch and (len(batch) == batch_size or wider * (len(batch) + 1) > token_budget):
            yield batch
            batch, wider = [], len(rows[i])
        batch.append(i)
        width = wider
    if batch:
        yield batch


def windows(ids: list[int], size: int, overlap: int = 32) -> list[list[int]]:
    """Split token ids into windows of at most ``size`` (overlapping a little, so a phrase cut at a
    window edge is still seen whole once). Checkers judge long texts as unsafe if any window is."""
    if len(ids) <= size:
        return [ids]
    overlap = min(overlap, size // 4)  # small windows must still advance
    step = max(1, size - overlap)
    return [ids[start:start + size] for start in range(0, max(1, len(ids) - overlap), step)]
