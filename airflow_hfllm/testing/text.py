"""The tiny text models: a Qwen2 causal LM and the safety checkers (T5 seq2seq, BERT classifier, Llama Guard).

All use the tokenizer of :mod:`airflow_hfllm.testing.tokenizer`. The ``llama-guard`` kind (a Llama causal
LM in the Llama Guard 3 format) extends it: it is also trained on the Llama Guard 3 prompt (so its words
are whole tokens, about as in Llama 3's vocab), has Llama 3's header tokens (``<|eot_id|>`` is eos), and
``"\n\n"`` and ``S1``...``S14`` as tokens.
"""

from __future__ import annotations

import os
import pathlib
import random

from airflow_hfllm.testing import KINDS, VERDICTS
from airflow_hfllm.testing.tokenizer import EOS, PAD, SAFETY_WORDS, WORDS, corpus, tokenizer_json
from airflow_hfllm.testing.weights import STD, STD_MLP, only_words, scale_eos

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

def _llama_guard_lines() -> tuple[str, ...]:
    from airflow_hfllm.safety.llama_guard import llama_guard_prompt

    prompts = (llama_guard_prompt([("User", "hi")]), llama_guard_prompt([("User", "hi"), ("Agent", "hello")]))
    return prompts * 25


def _make_tokenizer(kind: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    guard = kind == "llama-guard"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json(_llama_guard_lines() if guard else ())),
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
    text_kinds = [k for k in KINDS if k != "vision"]  # the vision model's tokenizer is testing.vision's
    if kind not in text_kinds:
        raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(text_kinds)}")
    return _make_tokenizer(kind)


def make_text_model(
    path: str | os.PathLike, kind: str, *, seed: int = 0, verdict: str | None = None
) -> pathlib.Path:
    """Write a tiny random text model of ``kind`` plus its tokenizer into ``path`` (through
    :func:`airflow_hfllm.testing.models.make_tiny_model`, which checks ``kind`` and ``verdict``)."""
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
        _init_wide(model)
        only_words(model.lm_head.weight, tok, keep=[tok.eos_token_id])  # EOS: calibrated below
    model.generation_config = GenerationConfig(**_ids(tok))
    model.eval()
    with torch.no_grad():
        _calibrate_eos(model, tok)
    return model


def _init_wide(model) -> None:
    """Wide random matrices (see :mod:`airflow_hfllm.testing.weights`): the reply depends on the prompt.
    Experts stored as 3-D tensors (MoE) are the MLP's too."""
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.dim() == 2:
            p.normal_(0, STD.get(name.split(".")[-2], STD_MLP))
        elif ".experts." in name and p.dim() == 3:
            p.normal_(0, STD_MLP)


def _calibrate_eos(model, tok) -> None:
    """Scale the EOS row of lm_head so that only a few greedy chat replies stop early (:func:`scale_eos`)."""
    rng = random.Random(99)
    lines, words = corpus(), [w for ws in WORDS.values() for w in ws]
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
    scale_eos(model, out.logits, eos)


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
        only_words(head, tok)
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
            _init_wide(model)
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
