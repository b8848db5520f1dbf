"""The huggingface connection type: token, cache dir and offline flag from an Airflow connection."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json
from airflow_hfllm.hooks.huggingface import HuggingFaceHook
options = HuggingFaceHook("hf_test").get_conn()
fallback = HuggingFaceHook().get_conn()
print("RESULT " + json.dumps({"repr": repr(options), "token": options.token, "cache_dir": options.cache_dir,
                               "offline": options.local_files_only, "fallback_token": fallback.token}))
"""


def test_connection_fields_and_env_fallback(tmp_path):
    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path), PYTHONPATH=str(ROOT), HF_TOKEN="hf_from_env_123",
               AIRFLOW_CONN_HF_TEST=json.dumps({"conn_type": "huggingface", "password": "hf_secret_token_1",
                                                "extra": {"cache_dir": "/models/hf", "offline": "true"}}))
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[7:])
    assert result["token"] == "hf_secret_token_1" and result["cache_dir"] == "/models/hf" and result["offline"]
    # no connection named huggingface_default: the environment applies
    assert result["fallback_token"] == "hf_from_env_123"
    # the token never shows in a repr (logs, task instance details)
    assert "hf_secret" not in result["repr"]
    assert "hf_secret_token_1" not in done.stderr


def test_provider_registers_connection_type(tmp_path):
    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path))
    airflow = str(Path(sys.executable).with_name("airflow"))
    done = subprocess.run([airflow, "providers", "hooks"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("huggingface"))
    assert "airflow_hfllm.hooks.huggingface.HuggingFaceHook" in line


# What GET /ui/connections/hook_meta answers (the route returns HookMetaService.hook_meta_data()): since
# Airflow 3.2 the connection form is built from the provider info alone, the hook is never imported.
HOOK_META_SCRIPT = """
import json
from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService
[meta] = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "huggingface"]
print("RESULT " + meta.model_dump_json())
"""


def test_connection_form_fields_in_hook_meta(tmp_path):
    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", HOOK_META_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert meta["hook_name"] == "HuggingFace"
    assert meta["hook_class_name"] == "airflow_hfllm.hooks.huggingface.HuggingFaceHook"
    fields = meta["standard_fields"]
    assert fields, f"no standard fields for the huggingface connection type (the form would be bare): {meta}"
    assert fields["password"] == {"hidden": False, "title": "HF token", "placeholder": None}
    assert fields["host"] == {"hidden": False, "title": "Hub endpoint (optional)",
                              "placeholder": "https://huggingface.co"}
    for name in ("login", "port", "url_schema"):
        assert fields[name] and fields[name]["hidden"], (name, fields[name])
    # The hook agrees with the form (one definition of the behaviour, two readers).
    from airflow_hfllm.hooks.huggingface import HuggingFaceHook

    behaviour = HuggingFaceHook.get_ui_field_behaviour()
    assert behaviour["relabeling"]["password"] == "HF token"
    assert sorted(behaviour["hidden_fields"]) == ["login", "port", "schema"]
