"""Data-parallel training under torchrun: who this process is (``World``), the process
group, and the few collectives the loop needs, all from torch.distributed itself.

``torchrun --nproc_per_node=N -m cifar_resnet.stages.train ...`` starts N copies of
the stage and hands each RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (and the
rendezvous address) in its environment. ``from_environment`` reads them into a
``World``, passed down as an argument; nothing here keeps state of its own beyond what
torch.distributed holds. Gradients are averaged by DistributedDataParallel (NCCL on
CUDA, gloo on the CPU); rank 0 alone tracks, checkpoints and registers.

Imports torch and the config's error type only, so the loop (engine) may use it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    rank: 0 .. size - 1 over all machines (rank 0 tracks, checkpoints, registers);
    size: the number of processes (1: a plain single-process run);
    local_rank: 0 .. local_size - 1 on this machine (the CUDA device index it trains on);
    local_size: processes on this machine (they share its CPU cores).
    """

    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0, the only one that talks to MLflow."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World(rank=0, size=1, local_rank=0, local_size=1)


def from_environment(environ: Mapping[str, str] = os.environ) -> World:
    """The World torchrun describes in ``environ`` (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE); ``SINGLE`` where WORLD_SIZE is not set (a plain ``python -m``).

    Raises ConfigError for values that are not integers or do not fit together
    (a rank outside 0 .. WORLD_SIZE - 1)."""
    if "WORLD_SIZE" not in environ:
        return SINGLE
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": environ["WORLD_SIZE"]}
    try:
        rank, size, local_rank, local_size = (
            int(environ.get(name, defaults.get(name, ""))) for name in names
        )
    except ValueError:
        shown = ", ".join(f"{n}={environ.get(n)!r}" for n in names)
        raise ConfigError(f"torchrun's environment is not integers: {shown}") from None
    if not (0 <= rank < size and 0 <= local_rank < local_size <= size):
        raise ConfigError(
            f"torchrun's environment does not fit together: RANK={rank}, WORLD_SIZE={size}, "
            f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_size}"
        )
    return World(rank, size, local_rank, local_size)


# --------------------------------------------------------------------------- checks


def per_rank_batch(global_batch: int, world: World) -> int:
    """Images each process trains on per step: ``train.batch_size`` is the global batch
    (what one step of the whole job sees), split evenly over the processes.

    Raises ConfigError when ``global_batch`` is not a multiple of ``world.size``."""
    if global_batch % world.size:
        raise ConfigError(
            f"train.batch_size={global_batch} is the global batch and must divide evenly "
            f"over the {world.size} processes; use a multiple of {world.size}"
        )
    return global_batch // world.size


def training_device(device: torch.device, world: World) -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` for CUDA under torchrun
    (one GPU a process), else ``device`` unchanged.

    Raises ConfigError for a device data-parallel training has no backend for (MPS:
    only CUDA with NCCL and the CPU with gloo), or for an explicit CUDA index, which
    torchrun's LOCAL_RANK decides."""
    if not world.distributed:
        return device
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(
            f"train.device resolves to {device}; data-parallel training runs on cuda "
            "(NCCL) or cpu (gloo)"
        )
    if device.type == "cpu":
        return device
    if device.index is not None:
        raise ConfigError(
            f"train.device={device} under torchrun: each process takes cuda:LOCAL_RANK; "
            "use train.device=cuda or auto (choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    return torch.device("cuda", world.local_rank)


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    """Raises ConfigError for ``train.sync_bn=true`` off CUDA: PyTorch's SyncBatchNorm
    trains on CUDA tensors only."""
    if sync_bn and device.type != "cuda":
        raise ConfigError(
            f"train.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm does not run on "
            f"{device.type}); drop it to keep per-process BatchNorm"
        )


def backend_for(device: torch.device) -> str:
    """The backend that carries the gradients on ``device``: nccl on CUDA, gloo elsewhere."""
    return "nccl" if device.type == "cuda" else "gloo"


def params(world: World, device: torch.device, batch_size: int) -> dict[str, Any]:
    """What a run logs of its processes: ``world_size``, ``dist_backend`` (``none`` for
    one process) and ``per_rank_batch_size`` (of the global ``batch_size``)."""
    return {
        "world_size": world.size,
        "dist_backend": backend_for(device) if world.distributed else "none",
        "per_rank_batch_size": per_rank_batch(batch_size, world),
    }


# --------------------------------------------------------------------------- the group


@contextlib.contextmanager
def process_group(world: World, timeout_minutes: float) -> Iterator[World]:
    """Join torchrun's processes (``init_process_group`` from its environment) for the
    duration of the block, then leave (``destroy_process_group``); nothing for one process.

    One group serves CPU tensors with gloo and, where CUDA is available, CUDA tensors
    with NCCL, so the group can be joined before the run's device is decided and the
    small CPU objects the ranks exchange (``from_main``) never touch a GPU.
    ``timeout_minutes`` bounds every collective: a rank that is gone or stuck makes
    the others fail with torch's timeout error instead of waiting for ever (and
    torchrun ends the job when any rank exits with an error).
    """
    if not world.distributed or dist.is_initialized():
        yield world
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend,
        rank=world.rank,
        world_size=world.size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    try:
        yield world
    finally:
        dist.destroy_process_group()


def data_parallel(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (rank 0's weights and buffers are
    broadcast to all at construction; gradients are averaged in ``backward``), or
    ``model`` itself for one process. The wrapper shares ``model``'s parameters:
    save, evaluate and average (Lookahead, EMA) ``model``, train the wrapper."""
    if not world.distributed:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with its BatchNorm layers replaced in place by SyncBatchNorm (batch
    statistics over all processes), keeping their parameters and running statistics;
    returns it. CUDA only (see ``check_sync_bn``)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def sum_across(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """``tensor`` summed over all processes, in place (any shape and dtype; on CUDA
    under NCCL, on the CPU under gloo); unchanged for one process."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def from_main(value: Any, world: World) -> Any:
    """Rank 0's ``value`` (any picklable object) on every process; ``value`` for one
    process. Every process must call it, in the same order."""
    if not world.distributed:
        return value
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
