"""One tracked training: the training path (``training``) inside an MLflow run, the
test set read once, the reports, and a registered version with its lineage.

The train and finetune stages call ``train_and_register``; MLflow itself is only
reached through ``tracking``. Everything that can fail on bad input fails before a
run is created; a SIGTERM (preemption, torchrun shutting down) ends the run KILLED
with the checkpoint of the last finished epoch, so that ``resume=<run id>`` goes on.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data, distributed, engine, hardware, interrupts, pipeline, plots, tracking, training
from .config import ConfigError, TrainSettings, recipe_line
from .serving import save_weights

CHECKPOINT_VERSION = 2  # 2: weights_only-loadable (RNG states as tensors, config as YAML text)


def last_checkpoint(checkpoint_dir: str | Path, run_id: str) -> Path:
    """Where the training loop (``engine.fit``) keeps run ``run_id``'s last epoch."""
    return Path(checkpoint_dir) / run_id / engine.LAST_CHECKPOINT


def load_resume_checkpoint(
    checkpoint_dir: str | Path, run_id: str, world: distributed.World = distributed.SINGLE
) -> dict:
    """The last checkpoint of run ``run_id``, checked: a run that finished, a checkpoint
    of another format, or a missing file is a ConfigError (one line, no run touched).

    Under torchrun only rank 0 asks MLflow about the run; every process reads the
    checkpoint file (on a shared or copied ``checkpoint_dir``)."""
    if world.is_main:
        status = tracking.run_status(run_id)
        if status is None:
            raise ConfigError(f"resume={run_id}: no such MLflow run in {tracking.tracking_uri()}")
        if status == "FINISHED":
            raise ConfigError(
                f"resume={run_id}: that run finished; there is nothing to resume "
                "(train a new run, or finetune its registered version)"
            )
    path = last_checkpoint(checkpoint_dir, run_id)
    if not path.is_file():
        raise ConfigError(
            f"resume={run_id}: no checkpoint at {path} "
            "(train.checkpoint_dir must match the original run's)"
        )
    checkpoint = engine.load_checkpoint(path)
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"resume={run_id}: {path} is a version {checkpoint.get('version')} "
            f"checkpoint; this code resumes version {CHECKPOINT_VERSION} only"
        )
    return checkpoint


def check_same_machine(checkpoint: dict, settings: TrainSettings, device: torch.device) -> None:
    """A resumed run continues on the device type and precision it started with, or it
    would not equal the uninterrupted run: anything else is a ConfigError."""
    started = checkpoint["machine"]
    now = {"device": device.type, "precision": settings.train.precision}
    if started != now:
        raise ConfigError(
            f"resume: the run started on {started['device']} in "
            f"{started['precision']}, this machine resolves to {now['device']} in "
            f"{now['precision']}; resume it where it started"
        )


def train_and_register(
    settings: TrainSettings,
    config: dict,
    *,
    resume_checkpoint: dict | None = None,
    resume_run_id: str | None = None,
    initial_state_dict: dict | None = None,
    extra_tags: dict[str, str] | None = None,
    requested_recipe: str | None = None,
    world: distributed.World = distributed.SINGLE,
) -> dict:
    """Train ``settings`` (``config`` is its resolved, untyped form, logged as params),
    read the test set once, log the reports and register the chosen weights.

    finetune passes ``initial_state_dict`` (trained ImageClassifier weights to start
    from) and ``extra_tags`` (lineage, set on the run and the registered version).
    ``requested_recipe`` is "auto" when the stage chose ``settings.recipe`` itself.
    Returns the summary metrics. Raises ConfigError/DataError before any run exists.

    Under torchrun (``world`` from ``distributed.from_environment``), every process
    joins the process group here and trains its share; rank 0 alone creates the run,
    checkpoints, reads the test set and registers, and the others return ``{}`` once
    the training is over.
    """
    with distributed.process_group(world, settings.train.dist_timeout_minutes):
        return _train_and_register(
            settings,
            config,
            world,
            resume_checkpoint=resume_checkpoint,
            resume_run_id=resume_run_id,
            initial_state_dict=initial_state_dict,
            extra_tags=extra_tags,
            requested_recipe=requested_recipe,
        )


def _train_and_register(
    settings: TrainSettings,
    config: dict,
    world: distributed.World,
    *,
    resume_checkpoint: dict | None,
    resume_run_id: str | None,
    initial_state_dict: dict | None,
    extra_tags: dict[str, str] | None,
    requested_recipe: str | None,
) -> dict:
    pipeline.check_network(settings)
    if settings.settings_from_run and world.is_main:  # looked up before any data is read
        extra_tags = {
            **(extra_tags or {}),
            **tracking.settings_source_tags(str(settings.settings_from_run), config),
        }
    requested_precision = settings.train.precision
    settings, device = pipeline.prepare_machine(settings, world)
    if resume_checkpoint is not None:
        check_same_machine(resume_checkpoint, settings, device)
    if world.is_main:
        print(recipe_line(requested_recipe, settings.recipe, device), flush=True)
        print(
            hardware.machine_line(device, requested_precision, settings.train.precision),
            flush=True,
        )
    splits = pipeline.load_data(settings.data)
    run = training.prepare(
        settings, splits, device, initial_state_dict=initial_state_dict, world=world
    )
    if not world.is_main:  # trains its share; MLflow, checkpoints and the test are rank 0's
        training.fit(run, resume=resume_checkpoint)
        return {}
    warning = pipeline.long_run_warning(settings, len(splits.train_labels), run.parts.model, device)
    if warning:
        print(warning, file=sys.stderr, flush=True)

    with interrupts.stoppable():
        # A name of our own: MLflow draws its random ones from the stream the seed has
        # just fixed, so every run with one seed would be called the same.
        run_name = f"{settings.recipe or 'base'}-{settings.model.name}-seed{settings.seed}"
        with tracking.training_run(
            settings.experiment_name,
            resume_run_id,
            run_name=f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags=extra_tags,
            system_metrics=True,
        ) as mlflow_run:
            try:
                summary = _tracked(
                    run, config, mlflow_run.info, resume_checkpoint, extra_tags, requested_recipe
                )
            except KeyboardInterrupt as stop:  # SIGTERM (interrupts.Terminated) or Ctrl-C
                run_id = mlflow_run.info.run_id
                saved = last_checkpoint(settings.train.checkpoint_dir, run_id).is_file()
                print(
                    f"\n{interrupts.stop_word(stop)}: the run is marked KILLED; "
                    + (
                        f"continue it with resume={run_id}"
                        if saved
                        else "no epoch was saved, so there is nothing to resume: start it again"
                    ),
                    file=sys.stderr,
                    flush=True,
                )
                raise
        if not settings.train.keep_checkpoints:
            # The run has FINISHED: best.pt and the model are in MLflow, and resume= refuses
            # a finished run, so nothing in its folder is of further use.
            folder = Path(settings.train.checkpoint_dir)
            shutil.rmtree(folder / mlflow_run.info.run_id)
            with contextlib.suppress(OSError):  # it holds killed runs' folders: they stay
                folder.rmdir()
        return summary


def _tracked(
    run: training.Training,
    config: dict,
    info,
    resume_checkpoint: dict | None,
    extra_tags: dict | None,
    requested_recipe: str | None,
) -> dict:
    settings, splits, device = run.settings, run.splits, run.device
    run_id = info.run_id
    print(f"MLflow run {run_id} (experiment {info.experiment_id})", flush=True)
    logger = tracking.EpochMetricLogger(run_id)
    if resume_checkpoint is None:
        params = run_params(run, device)
        if requested_recipe:
            params["requested_recipe"] = requested_recipe
        tracking.log_config(config, params)
        tracking.log_environment()
        tracking.log_dataset(
            splits.md5,
            len(splits.train_labels),
            len(splits.val_labels),
            len(splits.test_labels),
            settings.data.split_seed,
        )
    checkpoint_dir = Path(settings.train.checkpoint_dir) / run_id
    machine = {"device": device.type, "precision": settings.train.precision}
    if resume_checkpoint is not None:
        print(f"resumed after epoch {resume_checkpoint['state']['epoch']}", flush=True)
    state = training.fit(
        run,
        resume=resume_checkpoint,
        logger=logger,
        checkpoint_dir=checkpoint_dir,
        checkpoint_extra={
            "config": tracking.dump_config(config),
            "version": CHECKPOINT_VERSION,
            "machine": machine,
        },
    )

    if settings.settings_from_run:  # both runs of a final fit name each other
        tracking.tag_run(str(settings.settings_from_run), {"final_fit_run": run_id})
    if settings.train.test:
        # The chosen checkpoint is the best on validation; the test set is read once, here.
        tested, logits = training.test_once(run, checkpoint_dir)
    else:  # a run that only chooses settings: its final fit reads the test set
        training.load_chosen(run, checkpoint_dir)
        tested, logits = {}, None
    summary = {"epochs_trained": state.epoch, "chosen_epoch": state.best_epoch, **tested}
    has_val = len(splits.val_labels) > 0
    if has_val:
        summary["best_val_acc"] = state.best_val_acc
    tracking.log_metrics(summary)
    print(
        " | ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
        ),
        flush=True,
    )

    log_reports(state, splits, None if logits is None else logits.argmax(1).numpy())
    tracking.log_files([checkpoint_dir / "best.pt"], "checkpoints")
    weights = save_weights(
        checkpoint_dir / "weights.pt",
        run.parts.eval_model(),
        settings.model.name,
        settings.model.kwargs,
        list(data.CIFAR10_CLASSES),
    )
    model_info = tracking.log_classifier(weights, splits.test_images[:2])
    if settings.registry.register:
        tags = {
            **({"test_acc": f"{summary['test_acc']:.4f}"} if "test_acc" in summary else {}),
            "run_id": run_id,
            "model": settings.model.name,
            "parameters": run.parameters,
            "epochs": state.epoch,
            "recipe": settings.recipe,
            **(extra_tags or {}),
        }
        if has_val:
            tags["val_acc"] = f"{state.best_val_acc:.4f}"
        tags.update({k: f"{v:.4f}" for k, v in tested.items() if k.startswith("test_acc_tta")})
        version = tracking.register_model(
            model_info.model_uri,
            settings.registry.model_name,
            tags=tags,
            description=version_description(settings, summary, run_id, run.parameters),
        )
        print(f"registered {settings.registry.model_name} version {version.version}", flush=True)
    return summary


def version_description(
    settings: TrainSettings, summary: dict, run_id: str, parameters: int
) -> str:
    """What a registered version is, in a line or two: recipe, network, data, accuracy."""
    val = (
        f"val_acc {summary['best_val_acc']:.4f} (epoch {summary['chosen_epoch']}), "
        if "best_val_acc" in summary
        else "no validation split (last epoch taken), "
    )
    tta = "".join(f", {k} {v:.4f}" for k, v in summary.items() if k.startswith("test_acc_tta"))
    test = (
        f"test_acc {summary['test_acc']:.4f}{tta}"
        if "test_acc" in summary
        else "test set not read (train.test=false: its final fit reads it)"
    )
    return (
        f"recipe={settings.recipe} model={settings.model.name} ({parameters:,} parameters), "
        f"{summary['epochs_trained']} epochs, seed {settings.seed}, precision "
        f"{settings.train.precision}: {val}{test}. Source run {run_id}."
    )


def run_params(run: training.Training, device: torch.device) -> dict:
    return {
        "parameters": run.parameters,
        **pipeline.machine_params(run.settings, device),
        **distributed.params(run.world, device, run.settings.train.batch_size),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else tracking.processor_name(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "none",
        "git_commit": tracking.git_commit(),
        "train_images": len(run.splits.train_labels),
        "val_images": len(run.splits.val_labels),
        **{f"data_md5.{name}": md5 for name, md5 in run.splits.md5.items()},
    }


def log_reports(
    state: engine.TrainState, splits: data.CifarSplits, predictions: np.ndarray | None
) -> None:
    """Learning curves, and with the test ``predictions`` (N int class ids; None when
    the test set was not read) the confusion matrix, misclassified images and per-class
    accuracy."""
    names = list(data.CIFAR10_CLASSES)
    tracking.log_figure(plots.learning_curves(state.history), "plots/learning_curves.png")
    if predictions is None:
        return
    matrix = plots.confusion_matrix(splits.test_labels, predictions, len(names))
    tracking.log_figure(plots.confusion_figure(matrix, names), "plots/confusion_matrix.png")
    tracking.log_figure(
        plots.misclassified_grid(splits.test_images, splits.test_labels, predictions, names),
        "plots/misclassified.png",
    )
    tracking.log_text(plots.per_class_accuracy_csv(matrix, names), "per_class_accuracy.csv")
