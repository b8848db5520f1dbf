"""Tiny random-weight Hugging Face models built fully offline, for tests.

``make_tiny_model(path, kind)`` writes a model and a tokenizer with
``save_pretrained`` so that the ordinary ``Auto*.from_pretrained(path)`` calls
load them with ``HF_HUB_OFFLINE=1``.

Token conventions (one byte-level BPE tokenizer for every kind and seed, ~1230 tokens):

* ids 0, 1, 2 = ``<|endoftext|>`` (pad; also config bos and T5 decoder start),
  ``<|im_start|>``, ``<|im_end|>`` (eos),
* ``" safe"``, ``" unsafe"``, ``" true"``, ``" false"`` (leading space, as
  generated after a decoder start) and their bare forms are single tokens,
* generated text is space-separated words (other lm_head rows are zeroed), so
  ``decoded.split()[0]`` is the first generated token.

The ``llama-guard`` kind (a Llama causal LM in the Llama Guard 3 format) extends that tokenizer: it is
also trained on the Llama Guard 3 prompt (so its words are whole tokens, about as in Llama 3's vocab),
has Llama 3's header tokens (``<|eot_id|>`` is eos), and ``"\n\n"`` and ``S1``...``S14`` as tokens.
"""

from __future__ import annotations

import functools
import os
import pathlib
import random

SAFETY_KINDS = ("seq2seq-safety", "classifier-safety", "llama-guard")
KINDS = ("causal-lm", *SAFETY_KINDS, "vision")
VERDICTS = ("safe", "unsafe")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD, EOS = "<|endoftext|>", "<|im_end|>"
SAFETY_WORDS = ("safe", "unsafe", "true", "false")
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA_GUARD_CODES = tuple(f"S{i}" for i in range(1, 15))
# What a forced llama-guard model answers (then eos): the category line parses to S1 and S10.
LLAMA_GUARD_ANSWERS = {"safe": "safe", "unsafe": "unsafe\nS1,S10"}

# Written like Llama Guard 3's own chat template (string contents; the role judged follows from the
# number of messages, since a role set inside a Jinja loop does not leave it).
LLAMA_GUARD_TEMPLATE = (
    "{%- if messages|length % 2 == 0 %}{%- set role = 'Agent' %}{%- else %}{%- set role = 'User' %}{%- endif %}"
    "{{- '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n' }}"
    "{{- \"Task: Check if there is unsafe content in '\" + role + \"' messages in conversations according our \""
    " + 'safety policy with the below categories.\\n\\n<BEGIN UNSAFE CONTENT CATEGORIES>\\n' }}"
    "{%- for code, name in [('S1', 'Violent Crimes'), ('S2', 'Non-Violent Crimes'), ('S3', 'Sex Crimes'), "
    "('S4', 'Child Exploitation'), ('S5', 'Defamation'), ('S6', 'Specialized Advice'), ('S7', 'Privacy'), "
    "('S8', 'Intellectual Property'), ('S9', 'Indiscriminate Weapons'), ('S10', 'Hate'), ('S11', 'Self-Harm'), "
    "('S12', 'Sexual Content'), ('S13', 'Elections'), ('S14', 'Code Interpreter Abuse')] %}"
    "{{- code + ': ' + name + '.\\n' }}"
    "{%- endfor %}"
    "{{- '<END UNSAFE CONTENT CATEGORIES>\\n\\n<BEGIN CONVERSATION>\\n\\n' }}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{{- ('User' if message['role'] == 'user' else 'Agent') + ': ' + message['content'] | trim + '\\n\\n' }}"
    "{%- endfor %}"
    "{{- '<END CONVERSATION>\\n\\nProvide your safety assessment for ONLY THE LAST ' + role + ' message in the '"
    " + \"above conversation:\\n - First line must read 'safe' or 'unsafe'.\\n - If unsafe, a second line must \""
    " + 'include a comma-separated list of violated categories.<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\\n\\n' }}"
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_WORDS = {
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
_WORDS = {k: v.split("|") for k, v in _WORDS.items()}
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


def _corpus() -> list[str]:
    rng = random.Random(1234)  # fixed: the tokenizer is the same for every model seed
    lines = [rng.choice(_TEMPLATES).format_map(_Picker(rng)) for _ in range(1500)]
    return lines + [" ".join(SAFETY_WORDS)] * 50  # bare forms must become tokens too


def _llama_guard_lines() -> tuple[str, ...]:
    from airflow_hfllm.safety.llama_guard import llama_guard_prompt

    prompts = (llama_guard_prompt([("User", "hi")]), llama_guard_prompt([("User", "hi"), ("Agent", "hello")]))
    return prompts * 25


class _Picker(dict):
    def __init__(self, rng: random.Random):
        super().__init__()
        self.rng = rng

    def __missing__(self, key: str) -> str:
        return self.rng.choice(_WORDS[key])


@functools.lru_cache(maxsize=2)
def _tokenizer_json(extra: tuple[str, ...] = ()) -> str:
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
    tok.train_from_iterator(_corpus() + list(extra), trainer=trainer)
    return tok.to_str()


def _make_tokenizer(kind: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    guard = kind == "llama-guard"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(_llama_guard_lines() if guard else ())),
        pad_token=PAD,
        eos_token="<|eot_id|>" if guard else EOS,
        additional_special_tokens=["<|im_start|>", *(LLAMA3_SPECIAL_TOKENS if guard else ())],
        chat_template=LLAMA_GUARD_TEMPLATE if guard else CHAT_TEMPLATE,
        padding_side="left" if kind in ("causal-lm", "llama-guard") else "right",
        model_max_length=4096 if guard else 2048 if kind == "causal-lm" else 512,
        model_input_names=["input_ids", "attention_mask"],
    )
    if guard:
        tok.add_tokens(["\n\n", *LLAMA_GUARD_CODES])  # single tokens, as in Llama 3; "S10" beats "S1"
    for word in SAFETY_WORDS:
        for form in (word, " " + word):
            if len(tok.encode(form, add_special_tokens=False)) != 1:
                raise RuntimeError(f"tokenizer splits {form!r}")  # corpus/vocab bug
    return tok


def tokenizer(kind: str = "causal-lm"):
    """The tiny tokenizer of ``kind`` (e.g. for benchmarks that build random models in-process)."""
    if kind not in KINDS or kind == "vision":
        raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    return _make_tokenizer(kind)


def make_tiny_model(
    path: str | os.PathLike,
    kind: str = "causal-lm",
    *,
    seed: int = 0,
    verdict: str | None = None,
) -> pathlib.Path:
    """Write a tiny random model of ``kind`` plus its tokenizer into ``path``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    if verdict is not None and verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r}; allowed: None, {', '.join(VERDICTS)}")
    if verdict is not None and kind not in SAFETY_KINDS:
        raise ValueError(f"verdict applies only to the safety kinds {', '.join(SAFETY_KINDS)}")
    if kind == "vision":  # a tiny Qwen2.5-VL with its processor: its own module
        from airflow_hfllm.tiny_vision import make_tiny_vision_model

        return make_tiny_vision_model(path, seed=seed)
    import torch

    path = pathlib.Path(path)
    tok = _make_tokenizer(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        build = {"causal-lm": _causal_lm, "seq2seq-safety": _seq2seq, "classifier-safety": _classifier,
                 "llama-guard": _llama_guard}
        model = build[kind](tok, verdict)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _ids(tok) -> dict:
    return {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.pad_token_id}


def _causal_lm(tok, verdict):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=False, dtype="float32", **_ids(tok),
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and p.dim() == 2:
                p.normal_(0, _STD.get(name.split(".")[-2], _STD_DEFAULT))
        _only_words(model.lm_head.weight, tok, keep=[tok.eos_token_id])  # EOS: calibrated below
    model.generation_config = GenerationConfig(**_ids(tok))
    model.eval()
    with torch.no_grad():
        _calibrate_eos(model, tok)
    return model


# Default init (std 0.02) gives near-uniform attention and tiny logits: every reply is
# the same token or EOS. Unit-std embeddings/lm_head spread logits far apart (no
# near-ties, so batched == single greedy), sharper attention makes the next token
# depend on the prompt and not only on the shared "<|im_start|>assistant\n" tail.
_STD = {"embed_tokens": 1.0, "lm_head": 1.0, "q_proj": 0.3, "k_proj": 0.3, "v_proj": 0.3, "o_proj": 0.3}
_STD_DEFAULT = 0.15  # MLP
_EOS_STOP_FRACTION = 0.03


def _calibrate_eos(model, tok) -> None:
    """Scale the EOS row of lm_head so that ~_EOS_STOP_FRACTION of greedy replies stop early.

    How often a random row wins the argmax depends a lot on the seed (and on the
    model's own outputs), so measure it on greedy generations instead of guessing.
    """
    import torch

    rng = random.Random(99)
    lines, words = _corpus(), [w for ws in _WORDS.values() for w in ws]
    chats = []
    for i in range(96):  # varied lengths and shapes, like the prompts tests will use
        n = 3 + 5 * (i % 24)
        text = [
            " ".join(rng.sample(lines, 1 + n // 12)),
            " ".join(rng.choices(words, k=n)),
            " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(n)),
        ][i % 3]
        system = [{"role": "system", "content": rng.choice(lines)}] if i % 4 == 0 else []
        messages = system + [{"role": "user", "content": text}]
        chats.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    enc = tok(chats, return_tensors="pt", padding=True)
    eos = tok.eos_token_id
    out = model.generate(
        **enc, max_new_tokens=24, do_sample=False, suppress_tokens=[eos],
        output_logits=True, return_dict_in_generate=True,
    )
    logits = torch.stack(out.logits, dim=1)  # (batch, steps, vocab), raw: EOS logit included
    eos_logit = logits[..., eos].clone()
    logits[..., eos] = float("-inf")
    # With the row scaled by alpha, EOS wins a step where alpha > best / eos_logit.
    need = (logits.max(-1).values / eos_logit).where(eos_logit > 0, float("inf"))
    per_reply = need.min(dim=1).values.sort().values
    alpha = per_reply[int(_EOS_STOP_FRACTION * len(per_reply))]
    if torch.isfinite(alpha):  # else EOS never scored above 0: leave it rare as it is
        model.lm_head.weight[eos] *= alpha


def _seq2seq(tok, verdict):
    import torch
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    ids = _ids(tok)
    cfg = T5Config(
        vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        pad_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"],
        decoder_start_token_id=ids["pad_token_id"],
    )
    model = T5ForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id,
    )
    with torch.no_grad():
        # transformers 5 always ties T5's lm_head to the shared embedding; flan-t5 has its
        # own head (loading warns "will NOT tie them", as for the real checkpoint).
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
        model.all_tied_weights_keys.pop("lm_head.weight", None)
        head, emb = model.lm_head.weight, model.shared.weight
        # EOS is never generated, so generation runs the full max_new_tokens and the
        # category-score steps always exist.
        _only_words(head, tok)
        if verdict is not None:
            # Dimension `dim` of the decoder residual stream is 1e3 at the decoder-start
            # position and exactly 0 everywhere else (no other embedding or decoder
            # layer writes it), so after the final RMSNorm it dominates step 1 only.
            # The verdict row reads only that dimension: it wins step 1 by a wide
            # margin and scores 0 (never picked) later; the other verdict word never.
            dim = 0
            emb[:, dim] = 0
            emb[cfg.decoder_start_token_id, dim] = 1e3
            for layer in model.decoder.modules():
                if isinstance(layer, torch.nn.Linear) and layer.out_features == cfg.d_model:
                    layer.weight[dim] = 0
            head[:, dim] = 0
            head[[_single_id(tok, " " + v) for v in VERDICTS]] = 0
            head[_single_id(tok, " " + verdict), dim] = 10.0
    return model


def _classifier(tok, verdict):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    labels = dict(enumerate(VERDICTS))
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        id2label=labels, label2id={v: k for k, v in labels.items()},
    )
    model = BertForSequenceClassification(cfg)
    if verdict is not None:
        with torch.no_grad():
            # The pooled output is tanh-bounded, so |W @ pooled| << 20: the bias decides.
            model.classifier.bias.copy_(torch.tensor([20.0, -20.0] if verdict == "safe" else [-20.0, 20.0]))
    return model


def _only_words(head, tok, keep=()) -> None:
    """Zero the lm_head rows of all but " word" tokens.

    A zero row scores 0, far below the best of ~500 random logits, so it is never
    picked: outputs are space-separated words (``text.split()[0]`` is the first
    generated token) instead of byte soup and half-words.
    """
    words = (i for t, i in tok.get_vocab().items() if t[:1] == "\u0120" and t[1:].isascii() and t[1:].isalpha())
    keep = [*keep, *words]
    mask = head.new_ones(head.shape[0], dtype=bool)
    mask[keep] = False
    head[mask] = 0


def _single_id(tok, text: str) -> int:
    (token_id,) = tok.encode(text, add_special_tokens=False)
    return token_id


def _llama_guard(tok, verdict):
    """A Llama causal LM; with ``verdict``, it answers ``LLAMA_GUARD_ANSWERS[verdict]`` then eos,
    whatever the input (``None``: random weights, answers depend on the input)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = dict(_ids(tok), bos_token_id=tok.convert_tokens_to_ids("<|begin_of_text|>"))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, dtype="float32", **ids,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        if verdict is None:  # spread-out logits, as for the causal-lm kind, so verdicts vary with the input
            for name, p in model.named_parameters():
                if name.endswith(".weight") and p.dim() == 2:
                    p.normal_(0, _STD.get(name.split(".")[-2], _STD_DEFAULT))
        else:
            answer = tok.encode(LLAMA_GUARD_ANSWERS[verdict], add_special_tokens=False) + [tok.eos_token_id]
            _force_answer(model, answer)
    model.generation_config = GenerationConfig(**ids)
    return model


def _force_answer(model, answer: list[int], big: float = 100.0, weight: float = 4.0) -> None:
    """Make greedy decoding answer ``answer`` after any prompt, through a bigram table in reserved
    dimensions of the residual stream.

    Dimension ``dims[0]`` holds ``big`` in every token's embedding except the answer's own tokens,
    each of which holds it in its own dimension ``dims[k]`` instead. No layer writes those dimensions
    (their rows of o_proj and down_proj are zero), so at every position they still tell which token
    sits there, and after the final RMSNorm they dominate the hidden state. lm_head maps
    ``dims[0]`` to the answer's first token and ``dims[k]`` to the token after answer token k, so the
    next token depends only on the current one: the prompt's last token (not part of the answer) is
    followed by the first answer token, and so on to eos.
    """
    steps = list(zip(answer, answer[1:]))
    if len({a for a, _ in steps}) != len(steps):
        raise ValueError("an answer token repeats: a bigram table cannot spell it")
    hidden = model.config.hidden_size
    dims = list(range(hidden - 1 - len(steps), hidden))
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    emb[:, dims] = 0
    head[:, dims] = 0
    emb[:, dims[0]] = big
    head[answer[0], dims[0]] = weight
    for k, (token, following) in enumerate(steps, 1):
        emb[token, dims[0]] = 0
        emb[token, dims[k]] = big
        head[following, dims[k]] = weight
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[dims] = 0
        layer.mlp.down_proj.weight[dims] = 0
