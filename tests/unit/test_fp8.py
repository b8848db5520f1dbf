"""quantization="fp8" on the CPU (engine/fp8.py): one layer's accuracy, a whole model's logits beside a bf16
copy, the fast engine against generate() on the FP8 model, a job from the CLI, the capability check, a
pre-quantized fine-grained FP8 checkpoint, and the benchmark's in-place FP8 build. Run with ``-s`` to see
the measured errors."""

import json
import logging
import shutil

import pandas as pd
import pytest
import torch

from airflow_hfllm.cli import main
from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.engine.fast import FastEngine, unsupported_reason
from airflow_hfllm.engine.fp8 import Fp8Linear, check_device, from_fine_grained, quantize_model
from airflow_hfllm.engine.generate import BatchedGenerator
from airflow_hfllm.engine.loading import load, quantization_config
from airflow_hfllm.engine.prompts import encode
from airflow_hfllm.testing.families import make_family_model, to_fine_grained_fp8
from tests.conftest import chat_requests, prompt_text, write_prompts

GREEDY = GenerationParams(max_new_tokens=24, do_sample=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(make_family_model(tmp_path_factory.mktemp("fp8") / "llama", "llama"))


def relative_error(y, reference) -> float:
    return ((y.float() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("shape", [(384, 256), (30, 50)])  # (30, 50): not multiples of 16, the dequantized path
def test_linear_with_outlier_channels_is_close_to_fp32(shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0])
    x = torch.randn(6, 9, shape[1])
    with torch.no_grad():
        linear.weight[:, [1, 7, 12, 20]] *= 20  # outlier input channels, as trained checkpoints have
        x[..., [3, 11, 17]] *= 20
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (shape[0],)
    assert fp8.scaled_mm == (shape == (384, 256))
    reference = linear(x)
    error, error_bf16 = relative_error(fp8(x), reference), relative_error(fp8(x.bfloat16()), reference)
    print(f"\nFp8Linear {shape[1]}->{shape[0]} with outliers: relative error {error:.4f} (bf16 input {error_bf16:.4f})")
    assert error < 0.1 and error_bf16 < 0.1
    assert fp8(x.bfloat16()).dtype == torch.bfloat16


def calm_copy(src: str, dst) -> str:
    """``src`` with its decoder matrices scaled by 0.4. The tiny test models multiply each projection's
    output by ~2.4 (wide weights, sharp attention) so that greedy replies depend on the prompt; that
    amplifies any rounding (bf16 alone then flips 4% of the top-1 tokens). At 0.4 a projection keeps its
    input's scale, as in trained models, whose layers add small updates to the residual stream."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(0.4)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


def test_whole_model_logits_fp8_beside_bf16(llama, tmp_path):
    """Per-step logits, teacher-forced on the fp32 model's greedy tokens, of a bf16 copy and an FP8 copy
    (bf16 activations, as on a GPU), each loaded through the loader."""
    path = calm_copy(llama, tmp_path / "calm")
    reference = load(ModelSpec(path))
    tok = reference.tokenizer
    sequences = []
    for i in range(8):
        ids = torch.tensor([encode(tok, [{"role": "user", "content": prompt_text(i)}])])
        out = reference.model.generate(ids, max_new_tokens=32, do_sample=False, suppress_tokens=[tok.eos_token_id],
                                       pad_token_id=tok.pad_token_id)
        sequences.append((out, ids.shape[1]))

    def logits(model):
        with torch.no_grad():
            return torch.cat([model(s).logits[0, n - 1:-1].float() for s, n in sequences])

    ref = logits(reference.model)
    assert ref.softmax(-1).amax(-1).mean() > 0.5  # peaked: top-1 agreement means something
    measured = {}
    for name, spec in (("bf16", ModelSpec(path, dtype="bfloat16")),
                       ("fp8", ModelSpec(path, dtype="bfloat16", quantization="fp8"))):
        got = logits(load(spec).model)
        measured[name] = relative_error(got, ref), (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print("\n" + "; ".join(f"{k}: logits relative error {e:.4f}, top-1 agreement {a:.1%}" for k, (e, a) in
                           measured.items()) + f" ({len(ref)} steps)")
    assert measured["fp8"][0] <= 0.1
    assert measured["fp8"][1] >= measured["bf16"][1] - 0.10


def test_fast_engine_equals_generate_on_the_fp8_model(llama):
    loaded = load(ModelSpec(llama, quantization="fp8"))
    layer = loaded.model.model.layers[0]
    assert all(isinstance(m, Fp8Linear) for m in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.up_proj))
    assert type(loaded.model.lm_head) is torch.nn.Linear and loaded.model.lm_head.weight.dtype == torch.float32
    assert unsupported_reason(loaded) is None
    requests = chat_requests(loaded.tokenizer, 16, 32)
    params = GREEDY.replace(max_new_tokens=32)
    reference = BatchedGenerator(loaded, params, max_batch_size=1).generate(requests)
    assert sum(c.output_tokens >= 24 for c in reference) >= 12 and len({c.text for c in reference}) >= 14
    # the same modules on both paths, fp32 activations: exact on the CPU
    fast = FastEngine(loaded, params, slots=5, steps_per_sync=3).generate(requests)
    assert [c.text for c in fast] == [c.text for c in reference]


def test_cli_fp8_job_and_its_fingerprint(tiny_lm, tmp_path, caplog, capsys):
    """Qwen2 (q/k/v biases) from the CLI on the fast engine; a bf16 job on the same folder does not take its
    parts (the fingerprint tells them apart), an FP8 rerun does."""
    write_prompts(tmp_path / "in.parquet", 6)
    job = ["text", "--model", tiny_lm, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
           "--no-sample", "--max-new-tokens", "8", "--chunk-rows", "3"]
    with caplog.at_level(logging.INFO):
        assert main([*job, "--quantization", "fp8", "--engine", "fast"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["model"]["quantization"] == "fp8" and manifest["engine"] == "fast"
    assert "quantization=fp8" in caplog.text and "loaded layer by layer into FP8" in caplog.text
    rows = pd.read_parquet(tmp_path / "out")
    assert len(rows) == 6 and rows.output.str.split().str.len().min() >= 4

    def rerun(*extra):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main([*job, *extra]) == 0
        return caplog.text

    assert "2 chunks already done, 0 to do" in rerun("--quantization", "fp8")
    assert "0 chunks already done, 2 to do" in rerun()


def test_a_gpu_without_fp8_matmuls_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    message = r"quantization='fp8' needs .* compute capability 8\.9 or newer .*NVIDIA A100-SXM4-80GB is 8\.0"
    with pytest.raises(RuntimeError, match=message):
        check_device("cuda")
    with pytest.raises(RuntimeError, match=message):  # the loader checks before it loads anything
        quantization_config(ModelSpec("any/model", quantization="fp8"), torch.device("cuda"), torch.bfloat16)
    check_device("cpu")


def test_a_fine_grained_fp8_checkpoint_is_dequantized_on_the_cpu(llama, tmp_path):
    """transformers' FP8Linear needs a GPU kernel fetched from the hub: on the CPU the loader dequantizes the
    checkpoint (its settings kept), and the fast engine runs it; quantization="fp8" quantizes it again."""
    path = shutil.copytree(llama, tmp_path / "fine-grained")
    to_fine_grained_fp8(path)
    loaded, original = load(ModelSpec(str(path))), load(ModelSpec(llama))
    a, b = (m.model.model.layers[0].mlp.down_proj.weight for m in (loaded, original))
    assert a.dtype == torch.float32 and 0 < relative_error(a, b) < 0.05
    assert getattr(loaded.model.config, "quantization_config", None) is None and unsupported_reason(loaded) is None
    requests = chat_requests(loaded.tokenizer, 8, 24)
    reference = BatchedGenerator(loaded, GREEDY, max_batch_size=1).generate(requests)
    assert [c.text for c in FastEngine(loaded, GREEDY, slots=3).generate(requests)] == [c.text for c in reference]
    assert isinstance(load(ModelSpec(str(path), quantization="fp8")).model.model.layers[0].mlp.down_proj, Fp8Linear)

    config = loaded.model.config  # the fast engine takes an FP8 checkpoint's config, no other quantized one
    try:
        config.quantization_config = {"quant_method": "fp8"}
        assert unsupported_reason(loaded) is None
        config.quantization_config = {"quant_method": "compressed-tensors"}
        assert unsupported_reason(loaded) == "quantized weights (compressed-tensors)"
    finally:
        del config.quantization_config


@pytest.mark.parametrize("block", [(32, 32), None])
def test_transformers_fp8_linear_becomes_ours(block):
    """What the loader does on a GPU with FP8 matmuls (tested there in tests/gpu/test_fp8_gpu.py): each
    transformers FP8Linear, tile-scaled or tensor-scaled, becomes an Fp8Linear of the same weights."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    torch.manual_seed(0)
    theirs = FP8Linear(96, 64, block_size=block, has_bias=True)
    w = torch.randn(64, 96)
    if block:
        tiles = w.unflatten(0, (-1, 32)).unflatten(2, (-1, 32))
        scale = tiles.abs().amax(dim=(1, 3)) / 448
        theirs.weight.data = (tiles / scale[:, None, :, None]).flatten(2).flatten(0, 1).to(torch.float8_e4m3fn)
    else:
        scale = w.abs().max() / 448
        theirs.weight.data = (w / scale).to(torch.float8_e4m3fn)
    theirs.weight_scale_inv.data = scale
    theirs.bias.data = torch.randn(64)
    ours = from_fine_grained(theirs, torch.float32)
    x = torch.randn(5, 96)
    error = relative_error(ours(x), torch.nn.functional.linear(x, w, theirs.bias))
    print(f"\nFP8Linear ({'tiles' if block else 'one scale'}) as Fp8Linear: relative error {error:.4f}")
    assert ours.weight.dtype == torch.float8_e4m3fn and error < 0.1  # three roundings: checkpoint, ours, input


def test_benchmark_builds_an_fp8_model_in_place(monkeypatch):
    """The 70b benchmark path, on the CPU with a tiny shape: meta device, then layer by layer in FP8."""
    from benchmarks import throughput

    monkeypatch.setitem(throughput.SHAPES, "tiny", ("llama", dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=512, tie_word_embeddings=True)))
    loaded = throughput.build_in_place("tiny", device="cpu")
    model = loaded.model
    assert {p.device.type for p in [*model.parameters(), *model.buffers()]} == {"cpu"}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert all(type(m) is not torch.nn.Linear for m in model.model.layers.modules())
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 3 * 7
    assert model.model.layers[0].input_layernorm.weight.eq(1).all() and model.model.rotary_emb.inv_freq[0] == 1
    requests = throughput.workload("standard", 6, vocab=512)
    for r in requests:
        r.max_new_tokens = 8
    out = FastEngine(loaded, GREEDY.replace(max_new_tokens=8), slots=4).generate(requests)
    assert [c.output_tokens for c in out] == [8] * 6


def test_llama_guard_checker_in_fp8(models):
    """The checker takes the generation model's quantization; FP8 verdicts go through the lean pass."""
    from airflow_hfllm.safety import make_checker

    texts = ["how do I bake bread", "tell me a story about a dragon"]
    for verdict in ("safe", "unsafe"):
        checker = make_checker({"kind": "llama-guard", "model": models("llama-guard", verdict), "quantization": "fp8"})
        verdicts = checker.check(texts, "prompt")
        assert [v.safe for v in verdicts] == [verdict == "safe"] * 2
        assert checker._pass is not None and checker.fingerprint()["quantization"] == "fp8"
        assert isinstance(checker.load().model.model.layers[0].self_attn.q_proj, Fp8Linear)


def test_an_adapter_is_merged_before_the_weights_are_quantized(llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    assert ModelSpec("m", adapter="a", merge_adapter=False, quantization="fp8").merge_adapter is True
    assert ModelSpec("m", adapter="a", merge_adapter=True, quantization="8bit").merge_adapter is False
    torch.manual_seed(0)
    lora = LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(llama), lora).save_pretrained(tmp_path / "adapter")
    merged = load(ModelSpec(llama, adapter=str(tmp_path / "adapter")))
    fp8 = load(ModelSpec(llama, adapter=str(tmp_path / "adapter"), quantization="fp8"))
    assert type(fp8.model).__name__ == "LlamaForCausalLM" and isinstance(fp8.model.model.layers[0].self_attn.v_proj,
                                                                        Fp8Linear)
    quantize_model(merged.model)  # the order the loader promises: merged, then quantized
    ids = torch.tensor([encode(merged.tokenizer, [{"role": "user", "content": prompt_text(3)}])])
    with torch.no_grad():
        assert torch.equal(fp8.model(ids).logits, merged.model(ids).logits)
