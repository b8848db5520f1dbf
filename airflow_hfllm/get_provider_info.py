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
                "connection-type": "huggingface",
            }
        ],
    }
