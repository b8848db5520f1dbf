"""Claiming one GPU per task on a worker with several.

Pool slots say how many tasks may run, not which GPU each takes: without a claim, two tasks on one
worker both start on GPU 0. A task takes an exclusive lock file per device (held until its process
exits, also when it is killed) and pins itself with ``CUDA_VISIBLE_DEVICES`` before CUDA starts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import IO

log = logging.getLogger(__name__)


@dataclass
class GpuClaim:
    device: str
    lock: IO


def visible_gpus() -> list[str]:
    """Device ids this process may use, without initialising CUDA (which would fix the device set)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(n) for n, line in enumerate(ln for ln in listing.splitlines() if ln.startswith("GPU "))]


def claim_gpu(lock_dir: str | None = None) -> GpuClaim | None:
    """Take a free GPU and pin this process to it; ``None`` when there is at most one GPU."""
    gpus = visible_gpus()
    if len(gpus) <= 1:
        return None
    lock_dir = lock_dir or os.environ.get("HFLLM_GPU_LOCK_DIR", "/tmp/hfllm-gpu-locks")
    os.makedirs(lock_dir, exist_ok=True)
    for device in gpus:
        lock = open(os.path.join(lock_dir, f"gpu-{device}.lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        lock.write(str(os.getpid()))
        lock.flush()
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        log.info("claimed GPU %s of %d on this worker", device, len(gpus))
        return GpuClaim(device, lock)
    raise RuntimeError(f"all {len(gpus)} GPUs of this worker are claimed by other tasks: give the GPU pool "
                       "as many slots as the worker has GPUs")
