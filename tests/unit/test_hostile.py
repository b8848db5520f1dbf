"""Hostile inputs and environments: a full disk, templates that try to leave Jinja's sandbox, pickled
weights, models that ship their own code, and a hub token that must never be written anywhere."""

import builtins
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from fnmatch import fnmatch

import fsspec
import jinja2
import pandas as pd
import pyarrow.parquet as pq
import pytest

import airflow_hfllm.io.parts as parts
from airflow_hfllm.config import HubOptions
from airflow_hfllm.engine.loading import load
from airflow_hfllm.engine.prompts import encode
from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.io.parts import OutputDir
from airflow_hfllm.run.job import TextJob
from tests.conftest import write_prompts

GREEDY = GenerationParams(max_new_tokens=4, do_sample=False)
HFLLM = [sys.executable, "-m", "airflow_hfllm.cli"]


def job(model, tmp_path, **kw):
    kw.setdefault("params", GREEDY)
    kw.setdefault("chunk_rows", 10)
    kw.setdefault("output", str(tmp_path / "out"))
    kw.setdefault("input", str(tmp_path / "in.parquet"))
    return TextJob(model=model if isinstance(model, ModelSpec) else ModelSpec(model), **kw)


def stamps(folder) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("part-*.parquet")}


# -- 1. disk full while writing ---------------------------------------------------------------

class _FullDisk:
    """A file on a disk that fills up halfway through the write, as a real ENOSPC leaves it."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("victim", ["_tmp-*-part-00001.parquet.tmp", "_tmp-*-part-00001.json.tmp"],
                         ids=["part-data", "commit-record"])
def test_disk_full_mid_write_leaves_no_partial_part_and_a_rerun_completes(tiny_lm, tmp_path, monkeypatch, caplog,
                                                                          victim):
    prompts = write_prompts(tmp_path / "in.parquet", 30).prompt
    out = tmp_path / "out"
    real_open, hits = builtins.open, []

    def full_disk_open(path, mode="r", *args, **kw):
        f = real_open(path, mode, *args, **kw)
        if "w" in mode and fnmatch(os.path.basename(str(path)), victim):
            hits.append(path)
            return _FullDisk(f)
        return f

    # parts.py's own name shadows the builtin: only the output folder's writes see the full disk.
    with monkeypatch.context() as m:
        m.setattr(parts, "open", full_disk_open, raising=False)
        with caplog.at_level(logging.DEBUG), pytest.raises(OSError) as failed:
            job(tiny_lm, tmp_path).run()
    assert hits, "the full disk was never hit"
    assert failed.value.errno == errno.ENOSPC
    for text in prompts:
        assert text[:30] not in str(failed.value) and text[:30] not in caplog.text

    assert not (out / "_manifest.json").exists()
    assert not list(out.rglob("_tmp-*")), "the half-written temporary was left behind"
    folder = OutputDir(fsspec.filesystem("file"), str(out))
    records = folder.commits()
    for p in out.glob("part-*.parquet"):
        assert pq.read_table(p).num_rows == 10  # whole, never a torn file
    committed = {p.name for p in out.glob("part-*.parquet") if int(p.name[5:10]) in records}
    assert all(folder.intact(k, r) for k, r in records.items())
    assert committed == {"part-00000.parquet"}
    if victim.endswith(".parquet.tmp"):
        # The part itself never landed: what a reader sees is chunk 0, with its record.
        assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet"]
        assert sorted(pd.read_parquet(out).id) == list(range(10))
    before = {k: v for k, v in stamps(out).items() if k in committed}

    manifest = job(tiny_lm, tmp_path).run()
    rows = pd.read_parquet(out)
    assert sorted(rows.id) == list(range(30))
    assert manifest["counts"]["rows"] == 30 and len(manifest["parts"]) == 3
    assert {k: v for k, v in stamps(out).items() if k in before} == before, "a committed part was rewritten"
    assert len(manifest["attempts"]) == 2


# -- 2. template injection --------------------------------------------------------------------

def _arm(template: str, marker) -> str:
    return template.replace("MARKER", str(marker))


HOSTILE_TEMPLATES = {
    "row-mro": "{{ row.__class__.__mro__ }}",
    "str-subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler-popen": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "for-subclasses": "{% for x in ().__class__.__base__.__subclasses__() %}{% endfor %}",
    # These three create MARKER when rendered outside the sandbox (checked below).
    "cycler-makedirs": "{{ cycler.__init__.__globals__.os.makedirs('MARKER') }}",
    "self-import": "{{ self.__init__.__globals__.__builtins__.__import__('os').makedirs('MARKER') }}",
    "catch-warnings": "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'catch_warnings' %}"
                      "{{ c()._module.__builtins__['__import__']('os').makedirs('MARKER') }}{% endif %}{% endfor %}",
}


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_templates_escaping_the_sandbox_are_refused_and_never_run(tiny_lm, tmp_path, name):
    marker = tmp_path / "pwned"
    template = _arm(HOSTILE_TEMPLATES[name], marker)
    write_prompts(tmp_path / "in.parquet", 3)
    manifest = job(tiny_lm, tmp_path, prompt_template=template, max_error_rate=1.0).run()
    out = pd.read_parquet(tmp_path / "out")
    assert manifest["counts"]["errors"] == 3 and manifest["counts"]["generated"] == 0
    assert (out.finish_reason == "error").all() and out.output.isna().all()
    for error in out.error:
        assert error.startswith("prompt_template failed: access to attribute") and error.endswith("is unsafe."), error
    assert not marker.exists()
    if "MARKER" in HOSTILE_TEMPLATES[name]:
        # The payload is live: without the sandbox it does create the marker.
        jinja2.Environment().from_string(template).render(row={"id": 0, "prompt": "x"})
        assert marker.exists()


@pytest.mark.parametrize("template", [None, "Question: {{ row.prompt }}"], ids=["column", "template"])
def test_jinja_in_a_prompt_value_is_passed_through_literally(tiny_lm, tmp_path, template):
    marker = tmp_path / "pwned"
    # a word, not a number: pytest's temporary folders (in row 2's marker path) are numbered
    values = ["what is a {{ 'quag' ~ 'ga' }}", "what is a quagga",
              f"{{{{ cycler.__init__.__globals__.os.makedirs('{marker}') }}}}"]
    pd.DataFrame({"id": [0, 1, 2], "prompt": values}).to_parquet(tmp_path / "in.parquet")
    (tmp_path / "terms.txt").write_text("quagga\n")
    job(tiny_lm, tmp_path, prompt_template=template, safety_checkers=[f"blocklist:{tmp_path / 'terms.txt'}"]).run()
    out = pd.read_parquet(tmp_path / "out").sort_values("id").reset_index(drop=True)
    # Row 1 says quagga itself: the checker does read the prompt. Row 0 would say it only if rendered.
    assert out.prompt_safe.tolist() == [True, False, True]
    assert out.finish_reason[1] == "unsafe_prompt"
    assert out.error.isna().all() and out.output[[0, 2]].notna().all()
    assert not marker.exists()
    tokenizer = load(ModelSpec(tiny_lm)).tokenizer
    for i in (0, 2):
        literal = values[i] if template is None else f"Question: {values[i]}"
        assert out.prompt_tokens[i] == len(encode(tokenizer, [{"role": "user", "content": literal}]))


# -- 3. pickled weights -------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.mark.parametrize("weights", ["state-dict", "code-running"])
def test_pickled_base_weights_are_refused_and_never_unpickled(tiny_lm, tmp_path, weights):
    import torch
    from safetensors.torch import load_file
    from transformers.utils import WEIGHTS_NAME

    assert WEIGHTS_NAME == "pytorch_model.bin"  # the name from_pretrained would fall back to
    folder, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(tiny_lm, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state if weights == "state-dict" else _Payload(marker), folder / WEIGHTS_NAME)
    write_prompts(tmp_path / "in.parquet", 2)

    with pytest.raises(OSError) as failed:
        job(str(folder), tmp_path).run()
    message = str(failed.value)
    assert "model.safetensors" in message and str(folder) in message
    # Not torch.load's refusal of the pickle (weights_only), nor an unpickling error: never opened.
    assert "weights only" not in message.lower() and "pickle" not in message.replace(str(folder), "").lower()
    assert not marker.exists()
    assert not list((tmp_path / "out").glob("part-*")) and not (tmp_path / "out" / "_manifest.json").exists()
    if weights == "code-running":
        torch.load(folder / WEIGHTS_NAME, weights_only=False)  # the payload is live when unpickled
        assert marker.exists()


# -- 4. trust_remote_code --------------------------------------------------------------------

def _remote_code_model(tiny_lm, folder, markers, model_type: str):
    """The tiny model with config and tokenizer pointing at code in the folder that makes a marker on import."""
    shutil.copytree(tiny_lm, folder)
    bodies = {
        "configuration_evil": "from transformers import Qwen2Config\n"
                              "class EvilConfig(Qwen2Config):\n    model_type = 'evil'\n",
        "modeling_evil": "from transformers import Qwen2ForCausalLM\nfrom .configuration_evil import EvilConfig\n"
                         "class EvilModel(Qwen2ForCausalLM):\n    config_class = EvilConfig\n",
        "tokenization_evil": "from transformers import PreTrainedTokenizerFast\n"
                             "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n",
    }
    for name, body in bodies.items():
        (folder / f"{name}.py").write_text(f"import os\nos.makedirs({str(markers / name)!r}, exist_ok=True)\n{body}")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))


@pytest.mark.parametrize("model_type", ["qwen2", "evil"], ids=["known-type", "custom-type"])
def test_model_code_in_the_folder_never_runs_by_default(tiny_lm, tmp_path, monkeypatch, model_type):
    import transformers.dynamic_module_utils as dynamic

    folder, markers = tmp_path / "model", tmp_path / "markers"
    markers.mkdir()
    _remote_code_model(tiny_lm, folder, markers, model_type)
    write_prompts(tmp_path / "in.parquet", 3)
    spec = ModelSpec(str(folder))
    assert spec.trust_remote_code is False
    if model_type == "qwen2":
        # transformers has the class itself: it loads that, and ignores the folder's code.
        manifest = job(spec, tmp_path).run()
        assert manifest["counts"]["generated"] == 3
    else:
        with pytest.raises(ValueError, match="(?s)contains custom code which must be executed.*trust_remote_code=True"):
            job(spec, tmp_path).run()
        assert not list((tmp_path / "out").glob("part-*"))
    assert not list(markers.iterdir())

    # The trap is armed: trusting the folder runs all three files. Their copies go to a throwaway modules
    # cache, and the modules they become leave with the test.
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        loaded = load(ModelSpec(str(folder), trust_remote_code=True))
        assert type(loaded.model).__name__ == "EvilModel"
    finally:
        for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
            del sys.modules[name]
    assert sorted(p.name for p in markers.iterdir()) == ["configuration_evil", "modeling_evil", "tokenization_evil"]


# -- 5. the hub token ----------------------------------------------------------------------------

TOKEN = "hf_secret_xyz123"
WORD = "zanzibarquokka"  # in every prompt, in no tiny-model output


def _written(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _assert_no_token_in_folder(out):
    files = _written(out)
    assert {"_manifest.json", "_job.json"} <= set(files)
    assert any(n.startswith("_attempts/") for n in files) and any(n.startswith("_commits/") for n in files)
    for name, data in files.items():
        assert TOKEN.encode() not in data, name
    for p in out.glob("part-*.parquet"):
        for key, value in (pq.read_schema(p).metadata or {}).items():
            assert TOKEN.encode() not in key + value, p.name


def _prompts(tmp_path, n):
    df = write_prompts(tmp_path / "in.parquet", n)
    df["prompt"] = [f"{WORD} {text}" for text in df.prompt]
    df.to_parquet(tmp_path / "in.parquet", index=False)
    (tmp_path / "terms.txt").write_text("river\n")  # flags some prompts: the unsafe path logs too


def test_hub_token_never_written_by_the_cli(tiny_lm, tmp_path):
    _prompts(tmp_path, 8)
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*HFLLM, "-v", "text", "--model", tiny_lm, "--input", str(tmp_path / "in.parquet"), "--output",
         str(tmp_path / "out"), "--max-new-tokens", "4", "--no-sample", "--chunk-rows", "4", "--progress-every", "0",
         "--safety", f"blocklist:{tmp_path / 'terms.txt'}"],
        capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)["counts"]
    assert counts["rows"] == 8 and counts["unsafe_prompt"] > 0
    assert TOKEN not in done.stdout and TOKEN not in done.stderr
    assert WORD not in done.stderr and WORD not in done.stdout
    _assert_no_token_in_folder(tmp_path / "out")


def test_hub_token_never_logged_by_a_job(tiny_lm, tmp_path, caplog, capfd, monkeypatch):
    import transformers

    _prompts(tmp_path, 6)
    # Another folder than tiny_lm's: a model already in the process cache would not be loaded again,
    # and the token never handed to from_pretrained.
    folder = tmp_path / "model"
    shutil.copytree(tiny_lm, folder)
    given = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kw):
        given.append(kw.get("token"))
        return real(*args, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    # Every logger at DEBUG and reaching caplog, the libraries' own (transformers, huggingface_hub) too.
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    saved = [(lg, lg.level, lg.propagate, lg.disabled) for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.DEBUG)
            lg.propagate, lg.disabled = True, False
        with caplog.at_level(logging.DEBUG):
            the_job = job(str(folder), tmp_path, chunk_rows=3, progress_every=0,
                          hub=HubOptions(token=TOKEN, local_files_only=True),
                          safety_checkers=[f"blocklist:{tmp_path / 'terms.txt'}"])
            manifest = the_job.run()
    finally:
        for lg, level, propagate, disabled in saved:
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled
    assert given == [TOKEN]
    assert manifest["counts"]["rows"] == 6
    assert manifest["counts"]["unsafe_prompt"] > 0
    # The capture did reach past this package: the libraries' own records are in it.
    assert {"airflow_hfllm", "transformers"} <= {r.name.split(".")[0] for r in caplog.records}
    captured = capfd.readouterr()
    for text in (caplog.text, captured.out, captured.err, json.dumps(manifest), repr(the_job), repr(the_job.hub)):
        assert TOKEN not in text
    assert WORD not in caplog.text
    _assert_no_token_in_folder(tmp_path / "out")


def test_a_template_reaching_os_through_the_airflow_macros_never_runs(tiny_lm, tmp_path):
    from airflow.sdk.execution_time.context import MacrosAccessor

    marker = tmp_path / "pwned"
    write_prompts(tmp_path / "in.parquet", 3)
    # What the operator passes: the task's Airflow context, whose "macros" forwards to a module that
    # holds the uuid module, which holds os.
    manifest = job(tiny_lm, tmp_path, prompt_template=f"{{{{ macros.uuid.os.makedirs('{marker}') }}}}",
                   template_context={"macros": MacrosAccessor()}, max_error_rate=1.0).run()
    assert not marker.exists()
    assert manifest["counts"]["errors"] == 3
    # Plain functions among the macros still work.
    ok = job(tiny_lm, tmp_path, output=tmp_path / "out2", prompt_template="{{ macros.ds_add('2026-12-01', 1) }}",
             template_context={"macros": MacrosAccessor()}).run()
    assert ok["counts"]["errors"] == 0
