"""`mlflow run . -e finetune`: continue training a registered model and register
the result as a new version, with its lineage.

    python -m cifar_resnet.stages.finetune finetune.model_uri=models:/cifar10-resnet/3
    python -m cifar_resnet.stages.finetune finetune.from_study=cifar10-resnet train.epochs=10
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from .. import registry, tuning
from ..config import FinetuneSettings, section_settings, to_container, train_settings
from ..data import CIFAR10_CLASSES
from ..errors import UserError
from ..experiment import train_and_register
from . import CONF_DIR, hydra_recomposer, launch, report_user_errors, resolve_recipe

# MLproject parameter -> the config key (or group) it sets; `overrides` is the rest.
PARAMETERS = {
    "model_uri": "finetune.model_uri",
    "epochs": "train.epochs",
    "from_study": "finetune.from_study",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
}


@hydra.main(config_path=CONF_DIR, config_name="finetune", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    cfg, requested_recipe = resolve_recipe(cfg, hydra_recomposer("finetune"))
    config = to_container(cfg)
    settings = section_settings(FinetuneSettings, "finetune", config.pop("finetune"))
    train_settings(config)  # a bad value stops here, before the registry or weights are read
    source = registry.resolve(settings.model_uri)
    tags = source.lineage_tags()
    if settings.from_study:
        study = tuning.load_study(settings.from_study, settings.storage)
        best, params = tuning.best_params(study)
        config = tuning.with_values(config, params)
        tags.update(
            {"finetune.from_study": settings.from_study, "finetune.best_trial": str(best.number)}
        )
        print(
            f"study {settings.from_study!r}: best trial {best.number} (run "
            f"{tuning.trial_run_id(best) or '?'}, val_acc {best.value:.4f}): {params}",
            flush=True,
        )

    # save_weights' layout: the architecture travels with the weights, so model= is ignored.
    saved = torch.load(registry.download_weights(source), map_location="cpu", weights_only=True)
    if list(saved["class_names"]) != list(CIFAR10_CLASSES):
        raise UserError(
            f"{settings.model_uri} predicts {saved['class_names']}, not the CIFAR-10 classes"
        )
    config["model"] = {
        **config["model"],
        "name": saved["model_name"],
        "kwargs": dict(saved["model_kwargs"]),
    }
    print(
        f"fine-tuning {source.label} ({saved['model_name']}) for "
        f"{config['train']['epochs']} epochs at lr {config['optim']['lr']}",
        flush=True,
    )
    train_and_register(
        train_settings(config),
        config,
        initial_state_dict=saved["state_dict"],
        extra_tags=tags,
        requested_recipe=requested_recipe,
    )


if __name__ == "__main__":
    launch(main, PARAMETERS)
