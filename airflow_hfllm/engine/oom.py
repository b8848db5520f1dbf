"""What the fast engine does when CUDA runs out of memory (KV cache, prefill, graph capture): the job goes on
with half the slots instead of ending; only a row that does not fit in one slot ends, in ``error``."""

from __future__ import annotations

import logging

from airflow_hfllm.engine.generate import kv_bytes_per_token
from airflow_hfllm.engine.scheduler import Scheduler

log = logging.getLogger("airflow_hfllm.engine.fast")


def out_of_memory(engine, where: str, plan: tuple, sched: Scheduler, prefill: bool = False) -> None:
    """After CUDA ran out of memory ``where`` with ``plan`` = (slots, max_len, blocks): the running rows go back
    to the window and ``engine``'s state is released, to be rebuilt with half the slots (after a prefill, half
    the prefill group too), counted in its ``oom_splits``. One slot: its row ends in error; a KV cache of one
    slot that does not fit raises."""
    slots, max_len = plan[:2]
    running = sched.preempt()
    engine._release()
    if slots <= 1:
        if not running:
            import torch

            need = max_len * kv_bytes_per_token(engine.model, engine.dtype)
            free = torch.cuda.mem_get_info(engine.device)[0] if engine.device.type == "cuda" else 0
            raise RuntimeError(
                f"out of GPU memory for the fast engine's KV cache even with one slot: {max_len} tokens need "
                f"{need / 2**20:.0f} MiB ({free / 2**20:.0f} MiB free on {engine.device}); give the rows fewer "
                f"max_new_tokens or shorter prompts (max_prompt_tokens), or run on a GPU with more memory")
        for row in running:
            engine.oom_errors += 1
            tokens = len(row.request.input_ids) + row.request.max_new_tokens
            log.warning("one row does not fit in GPU memory (%d tokens in one slot); marked as error", tokens)
            sched.fail(row, f"out of GPU memory for {tokens} tokens")
        return
    engine.oom_splits += 1
    engine.max_slots = slots // 2
    engine.prefill_tokens = max(1, engine.prefill_tokens // 2) if prefill else engine.prefill_tokens
    sched.requeue(running)  # the same tokens again: their samples depend on seed, row id and step only
    log.warning("CUDA out of memory in %s with %d slots: %d running rows go back to the queue; continuing "
                "with %d slots, prefill groups of up to %d tokens (batch_size=%d would start there)",
                where, slots, len(running), engine.max_slots, engine.prefill_tokens, engine.max_slots)
