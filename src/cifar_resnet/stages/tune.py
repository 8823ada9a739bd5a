"""`mlflow run . -e tune`: an Optuna study over the train config; each trial a
nested MLflow run under this one.

    python -m cifar_resnet.stages.tune tune.max_trials=30 tune.epochs=15
    python -m cifar_resnet.stages.tune tune=seed tune.study_name=seed-space
    python -m cifar_resnet.stages.tune recipe=fast tune.storage=postgresql+psycopg://user@host/optuna

Several of these, on one machine or many, given one storage and study_name share the
study: each pulls its trials from it, until it has run ``tune.n_trials`` (this worker's
cap) or the study holds ``tune.max_trials`` (the whole study's).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .. import hardware, interrupts, pipeline, tracking, tuning
from ..config import TuneSettings, recipe_line, section_settings, to_container, train_settings
from . import CONF_DIR, hydra_recomposer, launch, report_user_errors, resolve_recipe

# MLproject parameter -> the config key (or group) it sets; `overrides` is the rest.
PARAMETERS = {
    "n_trials": "tune.n_trials",
    "max_trials": "tune.max_trials",
    "epochs": "tune.epochs",
    "study_name": "tune.study_name",
    "storage": "tune.storage",
}


@hydra.main(config_path=CONF_DIR, config_name="tune", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    cfg, requested_recipe = resolve_recipe(cfg, hydra_recomposer("tune"))
    config = to_container(cfg)
    tune_section = config.pop("tune")
    settings = section_settings(TuneSettings, "tune", tune_section)
    base = train_settings(config)  # the trials' common config, checked once
    space = tuning.parse_space(settings.space, config)
    base, device = pipeline.prepare_machine(base)
    print(recipe_line(requested_recipe, base.recipe, device), flush=True)
    print(
        hardware.machine_line(device, config["train"]["precision"], base.train.precision),
        flush=True,
    )
    splits = tuning.without_test_set(pipeline.load_data(base.data))
    objective = tuning.Objective(
        config, space, splits, device, settings.epochs, base.train.precision
    )
    study = tuning.open_study(settings)

    storage = tuning.describe_storage(settings.storage)  # no password in logs, params or YAML
    with (
        interrupts.stoppable(),
        tracking.training_run(
            base.experiment_name,
            run_name=f"tune {settings.study_name}",
            tags=tuning.study_tags(settings),
            system_metrics=True,
        ) as run,
    ):
        try:
            print(
                f"MLflow run {run.info.run_id} (experiment {run.info.experiment_id}); "
                f"study {settings.study_name!r} in {storage}",
                flush=True,
            )
            tracking.log_config(
                {**config, "tune": {**tune_section, "storage": storage}},
                {
                    **pipeline.machine_params(base, device),
                    "train_images": len(splits.train_labels),
                    "val_images": len(splits.val_labels),
                    **({"requested_recipe": requested_recipe} if requested_recipe else {}),
                },
            )
            ran = tuning.optimize(study, objective, settings)
            summary = tuning.log_summary(study)
            tracking.log_metrics({"trials_run": ran})
        except KeyboardInterrupt as stop:  # SIGTERM (interrupts.Terminated) or Ctrl-C
            print(
                f"\n{interrupts.stop_word(stop)}: this tune run ({run.info.run_id}) is marked "
                "KILLED, with any trial it was running failed; the same command continues "
                f"study {settings.study_name!r}, whose finished trials are kept",
                file=sys.stderr,
                flush=True,
            )
            raise
    counts = ", ".join(
        f"{summary[k]} {k.removeprefix('trials_')}"
        for k in ("trials_complete", "trials_pruned", "trials_failed", "trials_running")
    )
    print(f"study {settings.study_name!r}: {counts} ({ran} run here)", flush=True)
    if "best_value" in summary:
        print(
            f"best: trial {summary['best_trial']} (run {summary['best_run_id']}) "
            f"val_acc {summary['best_value']:.4f} "
            f"{summary['best_params']}",
            flush=True,
        )


if __name__ == "__main__":
    launch(main, PARAMETERS)
