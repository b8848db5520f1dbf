"""Quantized (bitsandbytes 8-bit / 4-bit) and PEFT adapter models on CPU: loading, cache keys, engines, CLI."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from airflow_hfllm.engine.cache import ModelCache
from airflow_hfllm.engine.fast import unsupported_reason
from airflow_hfllm.engine.generate import BatchedGenerator, Request
from airflow_hfllm.config import HubOptions
from airflow_hfllm.engine.loading import get_model, same_model
from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.run.job import TextJob
from tests.conftest import prompt_text, write_prompts

GREEDY = GenerationParams(max_new_tokens=16, do_sample=False)


@pytest.fixture(scope="module")
def adapter(tiny_lm, tmp_path_factory):
    """A LoRA adapter over the tiny LM with random non-zero weights (PEFT's default init is a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    path = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, config).save_pretrained(path)
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_lm
    return str(path)


def greedy_texts(loaded, n: int = 16) -> list[str]:
    requests = [Request(loaded.tokenizer(prompt_text(i)).input_ids, GREEDY.max_new_tokens) for i in range(n)]
    return [c.text for c in BatchedGenerator(loaded, GREEDY).generate(requests)]


def assert_long_and_varied(texts: list[str]) -> None:
    """Random tiny models can emit EOS or one token at once, which would make equality tests vacuous."""
    assert sum(len(t.split()) >= 8 for t in texts) >= 0.75 * len(texts), texts
    assert len(set(texts)) >= 0.75 * len(texts), texts


def test_merged_and_unmerged_adapter_agree_and_change_the_model(tiny_lm, adapter):
    cache = ModelCache()
    base = get_model(ModelSpec(tiny_lm), cache=cache)
    merged = get_model(ModelSpec(tiny_lm, adapter=adapter), cache=cache)
    unmerged = get_model(ModelSpec(tiny_lm, adapter=adapter, merge_adapter=False), cache=cache)
    assert type(merged.model).__name__ == "Qwen2ForCausalLM" and unsupported_reason(merged) is None
    assert type(unmerged.model).__name__.startswith("Peft") and unsupported_reason(unmerged) == "unmerged PEFT adapter"

    base_out, merged_out, unmerged_out = greedy_texts(base), greedy_texts(merged), greedy_texts(unmerged)
    assert_long_and_varied(merged_out)
    assert_long_and_varied(base_out)
    assert merged_out == unmerged_out
    assert sum(a != b for a, b in zip(merged_out, base_out)) >= 12  # the adapter does something


def test_cache_key_covers_quantization_and_adapter(tiny_lm, adapter):
    """Two users of one spec share a model; another adapter, merge mode or quantization loads its own."""
    cache = ModelCache()
    specs = {
        "plain": ModelSpec(tiny_lm),
        "merged": ModelSpec(tiny_lm, adapter=adapter),
        "unmerged": ModelSpec(tiny_lm, adapter=adapter, merge_adapter=False),
        "8bit": ModelSpec(tiny_lm, quantization=True),
        "8bit+adapter": ModelSpec(tiny_lm, quantization="8bit", adapter=adapter),
        "4bit": ModelSpec(tiny_lm, quantization="4bit"),
        "4bit-single": ModelSpec(tiny_lm, quantization="4bit", double_quant=False),
    }
    loaded = {name: get_model(spec, cache=cache) for name, spec in specs.items()}
    assert len(cache) == len(specs) and len({id(m) for m in loaded.values()}) == len(specs)
    # the same spec, however spelled, is the same object
    assert get_model(ModelSpec(tiny_lm, quantization="8bit"), cache=cache) is loaded["8bit"]
    assert get_model(ModelSpec(tiny_lm, quantization="8bit", adapter=adapter, merge_adapter=True),
                     cache=cache) is loaded["8bit+adapter"]  # quantized adapters are never merged
    assert get_model(ModelSpec(tiny_lm, adapter=adapter), cache=cache) is loaded["merged"]
    assert len(cache) == len(specs)

    def layer(name):
        model = loaded[name].model
        return (model.base_model.model if name.endswith("adapter") else model).model.layers[0].self_attn.q_proj

    assert type(layer("8bit")).__name__ == "Linear8bitLt" and type(layer("4bit")).__name__ == "Linear4bit"
    assert type(layer("8bit+adapter").base_layer).__name__ == "Linear8bitLt"
    nested = lambda name: getattr(layer(name).weight.quant_state, "original_nested",  # noqa: E731
                                  layer(name).weight.quant_state.nested)
    assert nested("4bit") and not nested("4bit-single")
    assert str(loaded["8bit"].dtype) == "torch.float16" and str(loaded["4bit"].dtype) == "torch.bfloat16"
    assert loaded["4bit"].model.get_memory_footprint() < loaded["plain"].model.get_memory_footprint()


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_model_runs_a_job_on_either_engine(tiny_lm, tmp_path, quantization):
    """bitsandbytes modules are the model's own, so the fast engine's layer code runs them (on a GPU, 4-bit
    inside CUDA graphs, 8-bit eagerly). Their matmuls depend on the batch's shape (8-bit splits outlier
    columns found over the whole batch; 4-bit computes in bf16), so the engines agree on most rows, not all."""
    write_prompts(tmp_path / "in.parquet", 12)
    run = lambda engine: TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / engine),  # noqa: E731
                                 model=ModelSpec(tiny_lm, quantization=quantization), params=GREEDY,
                                 chunk_rows=6, engine=engine).run()
    manifests = {engine: run(engine) for engine in ("auto", "fast")}
    assert manifests["auto"]["engine"] == "batched-generate"  # CPU
    assert manifests["fast"]["engine"] == "fast"
    for manifest in manifests.values():
        assert manifest["counts"]["generated"] == 12
        assert manifest["model"]["quantization"] == quantization
        assert manifest["model"]["double_quant"] is (True if quantization == "4bit" else None)
    auto, fast = (pd.read_parquet(tmp_path / engine).sort_values("id") for engine in ("auto", "fast"))
    assert (auto.output_tokens == GREEDY.max_new_tokens).sum() >= 6
    assert auto.output.str.split().str.len().min() >= 8
    # measured 11/12 (4bit) and 8/12 (8bit) rows equal; a broken path agrees on none
    assert (auto.output.values == fast.output.values).sum() >= 6


def test_fast_engine_runs_a_merged_adapter_and_refuses_an_unmerged_one(tiny_lm, adapter, tmp_path, caplog):
    write_prompts(tmp_path / "in.parquet", 20)
    run = lambda engine, merge=True: TextJob(  # noqa: E731
        input=str(tmp_path / "in.parquet"), output=str(tmp_path / f"{engine}-{merge}"), params=GREEDY,
        model=ModelSpec(tiny_lm, adapter=adapter, merge_adapter=merge), chunk_rows=10, engine=engine).run()
    assert run("fast")["engine"] == "fast" and run("batched")["engine"] == "batched-generate"
    fast = pd.read_parquet(tmp_path / "fast-True").sort_values("id").output.tolist()
    batched = pd.read_parquet(tmp_path / "batched-True").sort_values("id").output.tolist()
    assert_long_and_varied(batched)
    assert fast == batched

    with pytest.raises(ValueError, match="unmerged PEFT adapter"):
        run("fast", merge=False)
    with caplog.at_level(logging.INFO):
        assert run("auto", merge=False)["engine"] == "batched-generate"
    assert "unmerged PEFT adapter" in caplog.text
    unmerged = pd.read_parquet(tmp_path / "auto-False").sort_values("id").output.tolist()
    assert unmerged == batched


def test_adapter_for_another_base_model_is_refused(tiny_lm, adapter, tmp_path):
    other = shutil.copytree(tiny_lm, tmp_path / "other-model")  # same shapes, another folder
    with pytest.raises(ValueError, match=r"trained on base model .*, not .*other-model.*base_model_name_or_path"):
        get_model(ModelSpec(str(other), adapter=adapter), cache=ModelCache())


def test_same_model(tmp_path):
    here, there = tmp_path / "runs" / "a" / "checkpoint-500", tmp_path / "runs" / "b" / "checkpoint-500"
    here.mkdir(parents=True)
    there.mkdir(parents=True)
    snapshot = "/cache/hub/models--Qwen--Qwen2-7B/snapshots/0123abcd"
    cases = [
        ("Qwen/Qwen2-7B", "qwen/qwen2-7b", True),  # hub ids ignore case
        ("Qwen/Qwen2-7B", "Qwen/Qwen2-7B-Instruct", False),
        ("org-a/llama", "org-b/llama", False),  # same name, another owner
        ("Qwen/Qwen2-7B", "/models/Qwen2-7B", True),  # a local copy named like the model
        ("/models/Qwen2-7B", "Qwen/Qwen2-7B", True),
        ("Qwen/Qwen2-7B", str(here), False),
        ("Qwen/Qwen2-7B", snapshot, True),  # a folder of the HF cache is its hub id
        ("gpt2", "/cache/hub/models--gpt2/snapshots/abc", True),
        ("Qwen/Qwen2-7B-Instruct", snapshot, False),
        (str(here), str(here) + "/", True),
        (str(here), str(there), False),  # two folders on this machine with the same name
        ("/home/trainer/no-such-dir/checkpoint-500", str(here), True),  # trained elsewhere: the name is all we have
        ("/home/trainer/no-such-dir/checkpoint-400", str(here), False),
    ]
    assert [same_model(a, b) for a, b, _ in cases] == [want for *_, want in cases]


def test_missing_bitsandbytes_is_a_clear_error(tiny_lm, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ImportError, match=r"quantization='4bit' needs the bitsandbytes package \(pip install"):
        get_model(ModelSpec(tiny_lm, quantization="4bit"), cache=ModelCache())


def test_device_bitsandbytes_cannot_serve_is_a_clear_error(tiny_lm, monkeypatch):
    """Simulated: the int8 quantizer fails as it does where bitsandbytes has no kernel for the device."""
    import bitsandbytes

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no kernel for bitsandbytes::int8_vectorwise_quant on this device")

    monkeypatch.setattr(bitsandbytes.functional, "int8_vectorwise_quant", no_kernel)
    with pytest.raises(RuntimeError, match=r"bitsandbytes \S+ cannot run 8bit quantization on cpu: "
                                           r"NotImplementedError: no kernel"):
        get_model(ModelSpec(tiny_lm, quantization="8bit"), cache=ModelCache())


def test_cli_with_adapter_over_8bit_model(tiny_lm, adapter, tmp_path):
    write_prompts(tmp_path / "in.parquet", 8)
    done = subprocess.run(
        [sys.executable, "-m", "airflow_hfllm.cli", "text", "--model", tiny_lm, "--input", str(tmp_path / "in.parquet"),
         "--output", str(tmp_path / "out"), "--max-new-tokens", "12", "--no-sample",
         "--peft-model", adapter, "--quantization", "8bit"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["model"]["quantization"] == "8bit" and manifest["model"]["adapter"] == adapter
    assert manifest["model"]["merge_adapter"] is False  # never merged into quantized weights
    assert manifest["engine"] == "batched-generate" and "unmerged PEFT adapter" in done.stderr
    assert "MatMul8bitLt" not in done.stderr
    out = pd.read_parquet(tmp_path / "out")
    assert len(out) == 8 and out.output.str.split().str.len().min() >= 6


class _Pickled:
    """Unpickling it makes a folder: the stand-in for what a malicious ``.bin`` would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def pickle_adapter(tiny_lm, tmp_path_factory):
    """A real LoRA adapter saved the old way: ``adapter_model.bin`` (a pickle), no safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    path = tmp_path_factory.mktemp("bin-adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm), config).save_pretrained(
        path, safe_serialization=False)
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("adapter_model")) == ["adapter_model.bin"]
    return path


def test_adapter_without_safetensors_is_refused(tiny_lm, pickle_adapter, tmp_path, monkeypatch):
    import transformers

    loads = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: loads.append(args) or real(*args, **kwargs))
    with pytest.raises(ValueError, match=rf"adapter {re.escape(str(pickle_adapter))} has no "
                                         r"adapter_model\.safetensors.*convert it to safetensors"):
        get_model(ModelSpec(tiny_lm, adapter=str(pickle_adapter)), cache=ModelCache())
    with pytest.raises(ValueError, match=r"adapter folder .*/no-such-adapter does not exist"):
        get_model(ModelSpec(tiny_lm, adapter=str(tmp_path / "no-such-adapter")), cache=ModelCache())
    assert loads == []  # refused before the base model loads (minutes, for a large one)


def _evil_pickle_adapter(folder, base: str, marker) -> None:
    import torch

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj"], "base_model_name_or_path": base}))
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Pickled(marker)},
               folder / "adapter_model.bin")


@pytest.mark.parametrize("where", ["folder", "hub-cache"])
def test_pickled_adapter_is_never_unpickled(tiny_lm, tmp_path, monkeypatch, where):
    """torch's ``weights_only`` is the only thing between PEFT and a ``.bin``'s code; with it off (as in
    older torch and PEFT) the adapter must still be refused before anything is unpickled, from a folder
    and from the hub (here: a repo in an offline HF cache, where PEFT falls back to ``.bin`` by itself)."""
    import pickle

    import peft.utils.save_and_load as peft_io
    import torch

    # The pickle is live: loading it the way an unguarded loader would runs its code.
    probe = tmp_path / "probe"
    _evil_pickle_adapter(probe / "adapter", tiny_lm, probe / "ran")
    torch.load(probe / "adapter" / "adapter_model.bin", weights_only=False)
    assert (probe / "ran").is_dir()
    assert pickle.loads(pickle.dumps(_Pickled(probe / "ran-again"))) is None and (probe / "ran-again").is_dir()

    unpickled = []

    def unguarded(*args, **kwargs):
        unpickled.append(args)
        return torch.load(*args, **{**kwargs, "weights_only": False})

    monkeypatch.setattr(peft_io, "torch_load", unguarded)
    marker = tmp_path / "ran"
    if where == "folder":
        adapter, hub = tmp_path / "lora", HubOptions(local_files_only=True)
        _evil_pickle_adapter(adapter, tiny_lm, marker)
    else:
        commit = "0" * 40
        repo = tmp_path / "hub" / "models--acme--lora"
        _evil_pickle_adapter(repo / "snapshots" / commit, tiny_lm, marker)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        adapter, hub = "acme/lora", HubOptions(cache_dir=str(tmp_path / "hub"), local_files_only=True)
    with pytest.raises(ValueError, match=rf"adapter {re.escape(str(adapter))} has no adapter_model\.safetensors"):
        get_model(ModelSpec(tiny_lm, adapter=str(adapter)), hub=hub, cache=ModelCache())
    assert unpickled == [] and not marker.exists()
