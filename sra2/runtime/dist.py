"""Devices and processes: torchrun rank and world (gloo on the CPU, nccl on GPUs), autocast."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """Join the process group torchrun describes (if any) and return (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def deterministic(on: bool) -> None:
    """Deterministic kernels only (or any kernel) from here on in this process. cuBLAS needs a
    fixed workspace for it, read when its first handle is made: set before any matrix product."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Mixed precision on a GPU for "bf16"/"fp16"; a no-op for "fp32" and on the CPU."""
    if device.type == "cuda" and precision in AUTOCAST:
        return torch.autocast("cuda", AUTOCAST[precision])
    return nullcontext()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device(choice: str, rank: int = 0) -> torch.device:
    """``auto`` picks this rank's GPU when there is one, else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but no GPU is visible")
        index = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def mean_across_ranks(values: torch.Tensor) -> list[float]:
    """The mean over all processes of each value (the values themselves with one process)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values.tolist()
