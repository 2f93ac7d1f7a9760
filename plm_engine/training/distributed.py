"""Multi-process training through torch.distributed only (launched by torchrun): DDP, or FSDP2's
fully_shard per transformer block. gloo on CPU, nccl on GPU. No home-made communication."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # "none" | "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(mode: str, device_kind: str) -> DistInfo:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment).

    mode "auto" means DDP when WORLD_SIZE > 1; "ddp"/"fsdp" need torchrun; "none" runs one process.
    """
    if mode == "none" or (mode == "auto" and not launched_by_torchrun()):
        return DistInfo()
    if not launched_by_torchrun():
        raise RuntimeError(
            f"distributed={mode!r} needs the process to be launched by torchrun "
            "(RANK/WORLD_SIZE are not set); e.g. torchrun --nproc_per_node 2 -m plm_engine.cli train ..."
        )
    world = int(os.environ["WORLD_SIZE"])
    if mode == "auto" and world == 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, "ddp" if mode == "auto" else mode)


def wrap(model: torch.nn.Module, blocks, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """The model as the training step should call it: DDP(model), or every transformer block of `blocks`
    and then the whole model fully_shard-ed (FSDP2: parameters become DTensors, gathered per block)."""
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def all_reduce_mean(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """The mean over processes of each value (one collective for all of them)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world_size).tolist()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate a 1-D tensor of possibly different lengths from every process (eval predictions)."""
    if not info.enabled:
        return t
    n = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros(m, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every process when any process raised the flag (a signal seen by one rank stops all)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
