"""Provider info (entry point ``apache_airflow_provider``). Import-light on purpose: Airflow reads it in
every component, and since 3.2 builds the connection form from it without importing the hook."""

# The ``huggingface`` connection form, in the provider-info format Airflow 3.2+ reads (kebab-case
# ``hidden-fields``). The one definition: HuggingFaceHook.get_ui_field_behaviour() derives from it.
HUGGINGFACE_UI_FIELD_BEHAVIOUR = {
    "hidden-fields": ["schema", "port", "login"],
    "relabeling": {"password": "HF token", "host": "Hub endpoint (optional)"},
    "placeholders": {
        "extra": '{"cache_dir": "/models/hf", "offline": false}',
        "host": "https://huggingface.co",
    },
}


def ui_field_behaviour(kebab: bool = True) -> dict:
    """A fresh copy of :data:`HUGGINGFACE_UI_FIELD_BEHAVIOUR`: kebab-case keys for the provider info,
    snake-case (``hidden_fields``) for the hook method's format."""
    return {(k if kebab else k.replace("-", "_")): (list(v) if isinstance(v, list) else dict(v))
            for k, v in HUGGINGFACE_UI_FIELD_BEHAVIOUR.items()}


def get_provider_info():
    return {
        "package-name": "airflow-hfllm",
        "name": "HuggingFace batch LLM",
        "description": "Batch generation with open HuggingFace models on GPU workers.",
        "versions": ["0.1.0"],
        "integrations": [
            {
                "integration-name": "HuggingFace",
                "external-doc-url": "https://huggingface.co/docs/transformers",
                "tags": ["software"],
            }
        ],
        "operators": [
            {"integration-name": "HuggingFace",
             "python-modules": ["airflow_hfllm.operators.text", "airflow_hfllm.operators.vision",
                                "airflow_hfllm.operators.shards"]},
        ],
        "hooks": [
            {"integration-name": "HuggingFace", "python-modules": ["airflow_hfllm.hooks.huggingface"]},
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_hfllm.hooks.huggingface.HuggingFaceHook",
                "hook-name": "HuggingFace",
                "connection-type": "huggingface",
                "ui-field-behaviour": ui_field_behaviour(),
            }
        ],
    }
