"""The training path: seed -> network -> loaders and parts -> fit; the test read apart.

train, tune's trials, finetune, the bench scripts and the tests all go through
``prepare`` and ``fit`` (or ``train``, the two in one), so the same settings and
seed give the same run whoever starts it. Reading the test set is ``test_once``,
a step that train and finetune take once at the end and tune's trials never do.
Knows nothing of Hydra or MLflow: progress goes to an ``engine.EpochLogger``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import data, distributed, engine, hardware, pipeline
from .config import TrainSettings
from .models import count_parameters


@dataclass
class Training:
    """Everything one training needs, built in the one order that makes a seed mean
    one run: seed, network, loaders, parts (optimiser, schedule, Lookahead, EMA)."""

    settings: TrainSettings  # train.precision resolved (pipeline.prepare_machine)
    device: torch.device
    splits: data.CifarSplits
    parts: engine.TrainingParts
    batches: object  # epoch -> that epoch's batches (this process's share under torchrun)
    parameters: int  # of the network
    world: distributed.World  # the processes training together (SINGLE: just this one)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return hardware.autocast_dtype(self.settings.train.precision)


def prepare(
    settings: TrainSettings,
    splits: data.CifarSplits,
    device: torch.device,
    *,
    initial_state_dict: dict | None = None,
    world: distributed.World = distributed.SINGLE,
) -> Training:
    """Seed everything, then build the network, the epoch's loaders and the training parts.

    ``settings.train.precision`` must be resolved (fp32, bf16 or fp16; see
    ``pipeline.prepare_machine``), else ValueError. ``initial_state_dict``: trained
    ImageClassifier weights to start from (finetune); Lookahead's slow weights and the
    EMA start from them too. Raises ConfigError for a network over its parameter budget.
    Under torchrun (``world``, its process group joined), every process builds the
    same network from the same seed and loads this process's share of the batches;
    ``train.sync_bn`` turns the BatchNorm layers into SyncBatchNorm.
    """
    hardware.autocast_dtype(settings.train.precision)  # refuses an unresolved "auto"
    engine.seed_everything(settings.seed)
    net = pipeline.build_network(settings.model)
    batches = pipeline.train_batches(settings, splits, device, world)
    parts = pipeline.build_parts(settings, net, splits, pipeline.steps_per_epoch(batches), device)
    if initial_state_dict is not None:
        # Normalisation buffers included: the weights learnt with their source's mean/std.
        parts.model.load_state_dict(initial_state_dict)
        if parts.ema is not None:
            parts.ema.module.load_state_dict(initial_state_dict)
        if parts.lookahead is not None:
            parts.lookahead.reset()  # else its slow weights would pull back to the random init
    if settings.train.sync_bn and world.distributed:
        # After the optimiser's groups are made (they find BatchNorm by its class); the
        # converted layers keep the same parameter tensors.
        distributed.convert_sync_batchnorm(parts.model)
    return Training(settings, device, splits, parts, batches, count_parameters(net), world)


def fit(
    training: Training,
    *,
    resume: dict | None = None,
    logger=None,
    checkpoint_dir: Path | None = None,
    checkpoint_extra: dict | None = None,
) -> engine.TrainState:
    """Train ``training`` to ``settings.train.epochs``, validating, checkpointing and
    logging each epoch (see ``engine.fit``).

    ``resume``: a checkpoint (``engine.load_checkpoint``) to continue from; its parts,
    RNG states and history are restored, and epochs it holds that ``logger`` has not
    seen (``logger.last_logged_epoch()``) are logged first, so curves have no gap.
    """
    state = None
    if resume is not None:
        state = engine.restore(training.parts, resume)
        last_logged = getattr(logger, "last_logged_epoch", None)
        if last_logged is not None:
            for epoch, metrics in engine.unlogged_epochs(state, last_logged()):
                logger.log_epoch(epoch, metrics)
    s = training.settings
    return pipeline.run_fit(
        s,
        training.splits,
        training.parts,
        training.batches,
        training.device,
        state=state,
        checkpoint_dir=checkpoint_dir,
        checkpoint_extra=checkpoint_extra,
        logger=logger,
        world=training.world,
    )


def train(
    settings: TrainSettings,
    splits: data.CifarSplits,
    device: torch.device,
    *,
    logger=None,
    checkpoint_dir: Path | None = None,
) -> tuple[Training, engine.TrainState]:
    """``prepare`` then ``fit``: one whole training, as a tune trial or a test runs it."""
    training = prepare(settings, splits, device)
    return training, fit(training, logger=logger, checkpoint_dir=checkpoint_dir)


def load_chosen(training: Training, checkpoint_dir: Path) -> None:
    """Load the checkpoint chosen on validation (``best.pt``) into ``training.parts``
    without reading the test set: the end of a run with ``train.test: false``."""
    pipeline.load_chosen_checkpoint(training.parts, checkpoint_dir)


def test_once(training: Training, checkpoint_dir: Path) -> tuple[dict[str, float], torch.Tensor]:
    """Load the checkpoint chosen on validation (``best.pt``) into ``training.parts`` and
    read the test split: the only place a training reads it.

    Returns the metrics (``test_acc``, ``test_loss``, and ``test_acc_tta_<views>`` when
    ``train.tta`` names a view set) and the (N, 10) float32 test logits on the CPU.
    """
    return pipeline.test_chosen_checkpoint(
        training.settings, training.splits, training.parts, checkpoint_dir, training.device
    )
