"""A few steps of a small BatchNorm-free network under a World: what
test_distributed compares between one process and two. A module of its own, light
on imports, so that each spawned process starts fast."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from cifar_resnet import data, distributed, engine
from cifar_resnet.distributed import World

CPU = torch.device("cpu")


def random_set(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


class SmallNet(nn.Module):
    """No BatchNorm: every process computes the same function of its images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x.float() / 255)).flatten(1))

    def set_epoch(self, epoch: int) -> None:
        # Frozen after epoch 1, as airbench_net's stem bias is after 3: DDP must then
        # stop waiting for its gradient (engine.fit wraps the model anew).
        self.conv.bias.requires_grad_(epoch <= 1)


STEPS_DATA = random_set(n=64, seed=1)


def train_small(world: World) -> dict[str, torch.Tensor]:
    """Two epochs of 4 steps (global batch 16) of SmallNet under ``world``; its weights."""
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.2, total_steps=8)
    loader = data.TensorLoader(
        *STEPS_DATA, 16, CPU, shuffle=True, drop_last=True, seed=7, rank=world.rank,
        world_size=world.size,
    )  # fmt: skip

    def epoch_batches(epoch):
        loader.set_epoch(epoch)
        return loader

    parts = engine.TrainingParts(model, optimizer, scheduler)
    empty = np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64)
    state = engine.fit(
        parts, epoch_batches, *empty, CPU, epochs=2, channels_last=False, progress=False,
        world=world,
    )  # fmt: skip
    return {"weights": model.state_dict(), "history": state.history}


def train_in_process(rank: int, port: int, out: str) -> None:
    """torch.multiprocessing.spawn's target: rank ``rank`` of 2 trains, saves to ``out``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    world = distributed.from_environment()
    with distributed.process_group(world, timeout_minutes=1):
        result = train_small(world)
    torch.save(result, f"{out}/rank{rank}.pt")
