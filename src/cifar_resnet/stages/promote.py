"""`mlflow run . -e promote`: point the `champion` alias at the best registered
version by a metric; the former champion keeps `previous`.

    python -m cifar_resnet.stages.promote                          # best val_acc
    python -m cifar_resnet.stages.promote promote.version=3 promote.force=true

A test_* metric is refused unless promote.allow_test_selection=true: the champion
would be chosen on the data its test figure is reported on.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from .. import registry, tracking
from ..config import PromoteSettings, RegistrySettings, section_settings, to_container
from . import CONF_DIR, launch, report_user_errors

# MLproject parameter -> the config key (or group) it sets; `overrides` is the rest.
PARAMETERS = {
    "metric": "promote.metric",
    "force": "promote.force",
    "version": "promote.version",
    "allow_test_selection": "promote.allow_test_selection",
}


@hydra.main(config_path=CONF_DIR, config_name="promote", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    config = to_container(cfg)
    name = section_settings(RegistrySettings, "registry", config["registry"]).model_name
    p = section_settings(PromoteSettings, "promote", config["promote"])
    result = registry.promote(
        name,
        p.metric,
        None if p.version is None else str(p.version),
        p.force,
        p.alias,
        p.previous_alias,
        p.allow_test_selection,
    )
    print(f"{name}: {result.reason}", flush=True)
    # A record of who moved the alias, and why, next to the runs that made the versions.
    with tracking.training_run(
        config["experiment_name"],
        run_name=f"promote {name}",
        tags={
            "model_name": name,
            "promoted_version": result.version,
            "changed": str(result.changed).lower(),
            "reason": result.reason,
        },
    ):
        tracking.log_config(config, {"former_" + p.alias: result.champion or "none"})


if __name__ == "__main__":
    launch(main, PARAMETERS)
