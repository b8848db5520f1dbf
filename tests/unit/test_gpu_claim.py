"""GPU claims: tasks on one worker take different GPUs, and a claim ends with its process."""

import subprocess
import sys

import pytest

from airflow_hfllm.gpu import claim_gpu

HOLD = """
import sys, time
from airflow_hfllm.gpu import claim_gpu
claim = claim_gpu(sys.argv[1])
import os
print(claim.device, os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
time.sleep(60)
"""


def test_tasks_take_different_gpus(tmp_path, monkeypatch):
    locks = str(tmp_path / "locks")
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "PATH": "/usr/bin:/bin"}
    holders = []
    try:
        for _ in range(2):
            p = subprocess.Popen([sys.executable, "-c", HOLD, locks], stdout=subprocess.PIPE, text=True,
                                 env={**env, "PYTHONPATH": ":".join(sys.path)})
            holders.append(p)
            assert p.stdout.readline().split() in (["0", "0"], ["1", "1"])
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        with pytest.raises(RuntimeError, match="all 2 GPUs of this worker are claimed"):
            claim_gpu(locks)
        holders[0].kill()  # a killed task's claim ends with it
        holders[0].wait()
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        claim = claim_gpu(locks)
        assert claim is not None and claim.device == "0"
        import os
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    finally:
        for p in holders:
            p.kill()


def test_single_gpu_or_none_needs_no_claim(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert claim_gpu(str(tmp_path)) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert claim_gpu(str(tmp_path)) is None
