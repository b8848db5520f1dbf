"""An output's token ids as its text: what both engines write to the ``output`` column.

Special tokens are dropped, as ``decode(skip_special_tokens=True)`` does, except that gpt-oss's harmony
format keeps its meaning. gpt-oss writes its reasoning and its answer as messages on channels::

    <|channel|>analysis<|message|>…reasoning…<|end|>
    <|start|>assistant<|channel|>final<|message|>…answer…<|return|>

Dropping the special tokens alone would leave ``analysis…reasoning…assistantfinal…answer``. The analysis
channel becomes a ``<think>`` block before the rest (``final``, or ``commentary``), which is how Qwen3 and
DeepSeek-R1 write theirs, so ``reasoning=True`` moves it into the ``reasoning`` column the same way
(``run/rows.py`` ``split_reasoning``) and the output check sees the answer alone.
"""

from __future__ import annotations

import functools

CHANNEL, MESSAGE, START = "<|channel|>", "<|message|>", "<|start|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
THINKING = "analysis"


def output_text(tokenizer, ids: list[int]) -> str:
    """The text of the output tokens ``ids`` (see the module docstring)."""
    marks = _harmony(tokenizer)
    if marks is None or marks[CHANNEL] not in ids:
        return tokenizer.decode(ids, skip_special_tokens=True)
    channel_id, message_id, start_id = marks[CHANNEL], marks[MESSAGE], marks[START]
    ends = {marks[e] for e in ENDS if e in marks}
    thinking, answer = [], []
    part, header, channel = answer, [], None  # text before any channel is the answer's
    for t in ids:
        if t == channel_id:
            part, header = None, []
        elif t == message_id:
            words = tokenizer.decode(header, skip_special_tokens=True).split()
            channel = words[0] if words else None
            part = thinking if channel == THINKING else answer
            header = None
        elif t in ends or t == start_id:
            part, header = None, None  # the role after <|start|> is not text
        elif part is not None:
            part.append(t)
        elif header is not None:
            header.append(t)
    text = tokenizer.decode(answer, skip_special_tokens=True)
    if thinking:
        return f"<think>{tokenizer.decode(thinking, skip_special_tokens=True)}</think>{text}"
    return text


@functools.lru_cache(maxsize=16)  # once per tokenizer, not per output row: its added vocabulary is a new dict
def _harmony(tokenizer) -> dict[str, int] | None:
    """The harmony special tokens' ids of ``tokenizer``, or ``None`` when it has no channels."""
    vocab = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    if CHANNEL not in vocab or MESSAGE not in vocab:
        return None
    return {name: vocab[name] for name in (CHANNEL, MESSAGE, START, *ENDS) if name in vocab}
