"""`mlflow run . -e train`: train one model, track it, register it.

    python -m cifar_resnet.stages.train model=resnet18_slim train.epochs=30
    python -m cifar_resnet.stages.train resume=<mlflow run id>
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from .. import data, engine, hardware, pipeline, plots, tracking
from ..config import ConfigError, TrainSettings, to_container, train_settings
from ..models import count_parameters
from ..serving import save_weights
from . import CONF_DIR, hydra_recomposer, launch, report_user_errors, resolve_recipe

CHECKPOINT_VERSION = 1


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    resume = cfg.get("resume")
    checkpoint = None
    requested_recipe = None
    if resume:
        checkpoint = load_resume_checkpoint(to_container(cfg), resume)
        config = checkpoint["config"]  # the run continues with the config it started with
    else:
        cfg, requested_recipe = resolve_recipe(cfg, hydra_recomposer("train"))
        config = to_container(cfg)
    settings = train_settings(config)
    train_and_register(settings, config, resume_checkpoint=checkpoint, resume_run_id=resume,
                       requested_recipe=requested_recipe)


def load_resume_checkpoint(config: dict, run_id: str) -> dict:
    path = Path(config["train"]["checkpoint_dir"]) / run_id / "last.pt"
    if not path.is_file():
        raise ConfigError(f"resume={run_id}: no checkpoint at {path} "
                          "(train.checkpoint_dir must match the original run's)")
    return engine.load_checkpoint(path)


def train_and_register(settings: TrainSettings, config: dict, *,
                       resume_checkpoint: dict | None = None,
                       resume_run_id: str | None = None,
                       initial_state_dict: dict | None = None,
                       extra_tags: dict[str, str] | None = None,
                       requested_recipe: str | None = None) -> dict:
    """Everything that can fail on bad input fails before a run is created.

    finetune passes ``initial_state_dict`` (trained ImageClassifier weights to start
    from) and ``extra_tags`` (lineage, set on the run and the registered version).
    ``requested_recipe`` is "auto" when the stage chose ``settings.recipe`` itself."""
    # Seed first: the network's initial weights are part of what the seed fixes.
    engine.seed_everything(settings.seed)
    net = pipeline.build_network(settings.model)
    requested_precision = settings.train.precision
    settings, device = pipeline.prepare_machine(settings, net)
    if requested_recipe:
        print(f"recipe {requested_recipe} -> {settings.recipe} (device {device})", flush=True)
    print(f"device {device}: {hardware.describe(device)}; precision {requested_precision} -> "
          f"{settings.train.precision}", flush=True)
    splits = pipeline.load_data(settings.data)
    warning = pipeline.long_run_warning(settings, len(splits.train_labels), net, splits.mean,
                                        splits.std, device)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    batches = pipeline.train_batches(settings, splits, device)
    parts = pipeline.build_parts(settings, net, splits,
                                 pipeline.steps_per_epoch(batches), device)
    if initial_state_dict is not None and resume_checkpoint is None:
        # Normalisation buffers included: the weights learnt with their source's mean/std.
        parts.model.load_state_dict(initial_state_dict)
        if parts.ema is not None:
            parts.ema.module.load_state_dict(initial_state_dict)
        if parts.lookahead is not None:
            parts.lookahead.reset()  # else its slow weights would pull back to the random init

    with tracking.training_run(settings.experiment_name, resume_run_id, tags=extra_tags) as run:
        run_id = run.info.run_id
        print(f"MLflow run {run_id} (experiment {run.info.experiment_id})", flush=True)
        logger = tracking.EpochMetricLogger(run_id)
        state = None
        if resume_checkpoint is None:
            params = run_params(settings, parts.model, device, splits)
            if requested_recipe:
                params["requested_recipe"] = requested_recipe
            tracking.log_config(config, params)
        else:
            state = engine.restore(parts, resume_checkpoint)
            for epoch, metrics in engine.unlogged_epochs(state, logger.last_logged_epoch()):
                logger.log_epoch(epoch, metrics)
            print(f"resumed after epoch {state.epoch}", flush=True)
        checkpoint_dir = Path(settings.train.checkpoint_dir) / run_id
        state = pipeline.run_fit(settings, splits, parts, batches, device, state=state,
                                 checkpoint_dir=checkpoint_dir,
                                 checkpoint_extra={"config": config, "version": CHECKPOINT_VERSION},
                                 logger=logger)

        # The chosen checkpoint is the best on validation; the test set is read once, here.
        tested, logits = pipeline.test_chosen_checkpoint(settings, splits, parts, checkpoint_dir,
                                                         device)
        model = parts.eval_model()
        summary = {"best_val_acc": state.best_val_acc, "best_epoch": state.best_epoch,
                   "epochs_trained": state.epoch, **tested}
        tracking.log_metrics(summary)
        print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in summary.items()), flush=True)

        log_reports(state, splits, logits.argmax(1).numpy())
        tracking.log_files([checkpoint_dir / "best.pt"], "checkpoints")
        weights = save_weights(checkpoint_dir / "weights.pt", model, settings.model.name,
                               settings.model.kwargs, list(data.CIFAR10_CLASSES))
        model_info = tracking.log_classifier(weights, splits.test_images[:2])
        if settings.registry.register:
            version = tracking.register_model(
                model_info.model_uri, settings.registry.model_name,
                tags={"val_acc": f"{state.best_val_acc:.4f}",
                      "test_acc": f"{summary['test_acc']:.4f}",
                      "run_id": run_id, "model": settings.model.name,
                      "parameters": count_parameters(net), "epochs": state.epoch,
                      **(extra_tags or {})})
            print(f"registered {settings.registry.model_name} version {version.version}",
                  flush=True)
    return summary


def run_params(settings: TrainSettings, model: torch.nn.Module, device: torch.device,
               splits: data.CifarSplits) -> dict:
    return {
        "parameters": count_parameters(model),
        **pipeline.machine_params(settings, device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "none",
        "git_commit": tracking.git_commit(),
        "train_images": len(splits.train_labels),
        "val_images": len(splits.val_labels),
        **{f"data_md5.{name}": md5 for name, md5 in splits.md5.items()},
    }


def log_reports(state: engine.TrainState, splits: data.CifarSplits,
                predictions: np.ndarray) -> None:
    names = list(data.CIFAR10_CLASSES)
    matrix = plots.confusion_matrix(splits.test_labels, predictions, len(names))
    tracking.log_figure(plots.learning_curves(state.history), "plots/learning_curves.png")
    tracking.log_figure(plots.confusion_figure(matrix, names), "plots/confusion_matrix.png")
    tracking.log_figure(plots.misclassified_grid(splits.test_images, splits.test_labels,
                                                 predictions, names),
                        "plots/misclassified.png")
    tracking.log_text(plots.per_class_accuracy_csv(matrix, names), "per_class_accuracy.csv")


if __name__ == "__main__":
    launch(main, aliases={"epochs": "train.epochs", "model": "model"})
