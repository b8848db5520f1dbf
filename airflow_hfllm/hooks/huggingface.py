"""Connection type ``huggingface``: hub token, on-disk cache folder, offline flag, endpoint."""

from __future__ import annotations

import os
from typing import Any

from airflow.sdk import BaseHook

from airflow_hfllm.config import HubOptions
from airflow_hfllm.get_provider_info import ui_field_behaviour


class HuggingFaceHook(BaseHook):
    """Hub settings from an Airflow connection, falling back to the environment.

    The password field holds the token; extras: ``cache_dir``, ``offline`` (bool), ``endpoint``.
    Without a connection of that id, ``HF_TOKEN``/``HF_HOME``/``HF_HUB_OFFLINE`` apply. The token is
    never logged and never leaves the worker (not in XCom, not in the manifest).

    :param hf_conn_id: connection id.
    """

    conn_name_attr = "hf_conn_id"
    default_conn_name = "huggingface_default"
    conn_type = "huggingface"
    hook_name = "HuggingFace"

    def __init__(self, hf_conn_id: str | None = default_conn_name, **kwargs):
        super().__init__(**kwargs)
        self.hf_conn_id = hf_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """The connection form's behaviour in the hook method's format. Airflow 3.2+ reads it from the
        provider info instead (``ui-field-behaviour``); both come from one definition there."""
        return ui_field_behaviour(kebab=False)

    def get_conn(self) -> HubOptions:
        env = HubOptions.from_env()
        if not self.hf_conn_id:
            return env
        try:
            conn = self.get_connection(self.hf_conn_id)
        except Exception:
            if self.hf_conn_id == self.default_conn_name:
                return env
            raise
        extra = conn.extra_dejson
        if conn.host:
            # huggingface_hub reads the endpoint from the environment only.
            os.environ["HF_ENDPOINT"] = conn.host
        offline = extra.get("offline", env.local_files_only)
        if isinstance(offline, str):
            offline = offline.lower() in ("1", "true", "yes")
        return HubOptions(
            cache_dir=extra.get("cache_dir") or env.cache_dir,
            token=conn.password or env.token,
            local_files_only=bool(offline),
        )

    def test_connection(self) -> tuple[bool, str]:
        options = self.get_conn()
        if options.local_files_only:
            return True, "offline: models load from the cache folder only"
        try:
            from huggingface_hub import HfApi

            name = HfApi(token=options.token).whoami()["name"]
        except Exception as exc:
            return False, f"hub check failed: {type(exc).__name__}"
        return True, f"token valid for {name}"
