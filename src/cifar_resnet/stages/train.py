"""`mlflow run . -e train`: train one model, track it, register it.

python -m cifar_resnet.stages.train model=resnet18_slim train.epochs=30
python -m cifar_resnet.stages.train resume=<mlflow run id>
torchrun --standalone --nproc_per_node=2 -m cifar_resnet.stages.train ...   (docs/scaling.md)
"""

from __future__ import annotations

import hydra
import yaml
from omegaconf import DictConfig

from .. import distributed, experiment
from ..config import ConfigError, to_container, train_settings
from . import (
    CONF_DIR,
    NPROC,
    hydra_recomposer,
    launch,
    recomposer,
    report_user_errors,
    resolve_recipe,
    task_overrides,
)

# What may come with resume=: where the checkpoints are. Anything else would make the
# resumed run differ from the one it continues.
RESUME_OVERRIDES = ("resume", "train.checkpoint_dir")


# MLproject parameter -> the config key (or group) it sets; `overrides` is the rest.
# `nproc` sets no key: it is how many processes torchrun starts (see stages.launch).
PARAMETERS = {"epochs": "train.epochs", "model": "model", "nproc": NPROC}


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    world = distributed.from_environment()  # torchrun's processes, or just this one
    resume = cfg.get("resume")
    checkpoint = None
    requested_recipe = None
    if resume:
        extra = [
            o for o in task_overrides() if o.split("=", 1)[0].lstrip("+~") not in RESUME_OVERRIDES
        ]
        if extra:
            raise ConfigError(
                f"resume={resume} continues the run with its own config; "
                f"drop the overrides {' '.join(extra)}"
            )
        checkpoint = experiment.load_resume_checkpoint(cfg.train.checkpoint_dir, resume, world)
        config = yaml.safe_load(checkpoint["config"])
    else:
        cfg, requested_recipe = resolve_recipe(cfg, hydra_recomposer("train"))
        config = to_container(cfg)
    experiment.train_and_register(
        train_settings(config),
        config,
        resume_checkpoint=checkpoint,
        resume_run_id=resume,
        requested_recipe=requested_recipe,
        world=world,
    )


def check_before_torchrun(overrides: list[str], nproc: int) -> None:
    """The checks every one of ``nproc`` processes would make alike, made once before
    torchrun starts them: the config's types and ranges, and a global batch that
    divides over the processes. Raises ConfigError. A resumed run's config is its
    checkpoint's, and a config Hydra cannot compose is Hydra's to report: both are left
    to the processes."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            cfg = compose("train", overrides=overrides)
            if cfg.get("resume"):
                return
            cfg, _ = resolve_recipe(cfg, recomposer("train", overrides))
        except HydraException:
            return
    settings = train_settings(to_container(cfg))
    distributed.per_rank_batch(settings.train.batch_size, distributed.World(0, nproc, 0, nproc))


if __name__ == "__main__":
    launch(main, PARAMETERS, preflight=check_before_torchrun)
