"""The one byte-level BPE tokenizer of the tiny models, trained offline on a generated corpus.

Token conventions (the same vocabulary for every kind and seed, ~1230 tokens):

* ids 0, 1, 2 = ``<|endoftext|>`` (pad; also config bos and T5 decoder start),
  ``<|im_start|>``, ``<|im_end|>`` (eos),
* ``" safe"``, ``" unsafe"``, ``" true"``, ``" false"`` (leading space, as
  generated after a decoder start) and their bare forms are single tokens,
* generated text is space-separated words (:func:`airflow_hfllm.testing.weights.only_words` zeroes the
  other lm_head rows), so ``decoded.split()[0]`` is the first generated token.

:mod:`.text` and :mod:`.vision` wrap it in their own ``PreTrainedTokenizerFast`` (special tokens, chat
template); the Llama Guard kind trains it on extra lines (``tokenizer_json(extra)``).
"""

from __future__ import annotations

import functools
import random

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD, EOS = "<|endoftext|>", "<|im_end|>"
SAFETY_WORDS = ("safe", "unsafe", "true", "false")

_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

WORDS = {
    "subj": "the cat|a dog|my neighbour|the teacher|our team|the old man|a young girl|the pilot|"
    "the doctor|every student|the farmer|a stranger|the robot|my sister|the committee|a bird|"
    "the engineer|the river|the council|a small child|the chef|the author|his brother|the crowd",
    "verb": "sees|likes|builds|paints|reads|carries|finds|watches|cleans|opens|writes|sells|"
    "fixes|follows|loses|wants|checks|moves|answers|describes|measures|borrows|hides|explains",
    "obj": "the house|a letter|the garden|an apple|the bridge|a story|the window|the old car|"
    "a bright lamp|the map|a heavy box|the report|some bread|the computer|a green boat|the key|"
    "the question|a warm coat|the machine|the picture|a quiet song|the budget|the data|the file",
    "adj": "quiet|bright|heavy|strange|quick|careful|happy|angry|small|large|ancient|modern|"
    "simple|complex|cold|warm|dangerous|gentle|noisy|clean|dirty|honest|useful|empty",
    "adv": "slowly|quickly|carefully|often|rarely|always|never|today|yesterday|again|early|late",
    "place": "in the park|at the station|near the lake|on the hill|in the city|at school|"
    "under the tree|in the kitchen|at the market|by the sea|in the office|on the train",
    "verdict": "safe|unsafe|true|false",
    "noun": "time|year|people|way|day|thing|world|life|hand|part|place|case|week|company|system|"
    "program|number|group|problem|fact|water|money|month|lot|right|study|book|eye|job|word|"
    "business|issue|side|kind|head|service|friend|father|power|hour|game|line|end|member|law|"
    "community|name|president|team|minute|idea|body|information|back|parent|face|others|level|"
    "door|health|person|art|war|history|party|result|change|morning|reason|research|girl|guy|"
    "moment|air|force|education|foot|boy|age|policy|music|market|sense|nation|plan|college|"
    "interest|death|experience|effect|class|control|care|field|development|role|effort|rate|"
    "heart|drug|show|leader|light|voice|wife|police|mind|price|report|decision|son|view|"
    "relationship|town|road|arm|difference|value|building|action|model|season|society|tax|"
    "director|position|player|record|paper|space|ground|form|event|official|matter|center|"
    "couple|site|project|activity|star|table|need|court|oil|situation|cost|industry|figure|"
    "street|image|phone|nature|film|evidence|network|weather|mountain|island|forest|winter",
    "verb2": "accept|allow|arrive|become|believe|bring|change|choose|consider|continue|create|"
    "decide|develop|expect|explain|happen|include|improve|imagine|increase|leave|learn|listen|"
    "maintain|notice|offer|prepare|protect|provide|receive|reduce|remember|replace|report|"
    "require|return|share|suggest|support|travel|understand|visit|wonder|organize|promise",
}
WORDS = {k: v.split("|") for k, v in WORDS.items()}
_TEMPLATES = (
    "{subj} {verb} {obj} {place}.",
    "{subj} {adv} {verb} {obj}.",
    "Why does {subj} {adv} look so {adj}?",
    "Yesterday {subj} {verb} {obj} and it was {adj}.",
    "Is it {verdict} that {subj} {verb} {obj} {place}?",
    "The answer is {verdict}, because {subj} {verb} {obj}.",
    "{verdict} or {verdict}: {subj} is {adj} {place}.",
    "Please tell me whether {obj} is {verdict} or {verdict}.",
    "Is the <Text> field safe or unsafe? <Text> {subj} {verb} {obj} <Context> ",
    "{subj} said: \"I think {obj} is {adj}, not {adj}!\"",
    "In 2024, {subj} {verb} {obj} {adv}; the cost was $15.99 (about 14 EUR).",
    "def f(x):\n    return x * 2  # {subj} {verb} {obj}",
    "We {verb2} the {noun} and {verb2} every {noun} of the {noun}.",
    "Could you {verb2} why the {noun} is {adj} and the {noun} is not?",
    "The {adj} {noun} will {verb2} the {noun} {place} {adv}.",
    "Most {noun}s {verb2} their {noun} before the {noun} starts.",
    "{noun}, {noun}, {noun} and {noun}: we {verb2} them all.",
)


def corpus() -> list[str]:
    """The training lines: generated sentences (the same for every model seed) and the bare safety words."""
    rng = random.Random(1234)  # fixed: the tokenizer is the same for every model seed
    lines = [rng.choice(_TEMPLATES).format_map(_Picker(rng)) for _ in range(1500)]
    return lines + [" ".join(SAFETY_WORDS)] * 50  # bare forms must become tokens too


class _Picker(dict):
    def __init__(self, rng: random.Random):
        super().__init__()
        self.rng = rng

    def __missing__(self, key: str) -> str:
        return self.rng.choice(WORDS[key])


@functools.lru_cache(maxsize=2)
def tokenizer_json(extra: tuple[str, ...] = ()) -> str:
    """The trained tokenizer as JSON, trained on :func:`corpus` plus ``extra`` lines."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Exactly the pipeline transformers' Qwen2Tokenizer rebuilds from vocab + merges
    # (AutoTokenizer forces that class for model_type qwen2), so every kind encodes alike.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() + list(extra), trainer=trainer)
    return tok.to_str()
