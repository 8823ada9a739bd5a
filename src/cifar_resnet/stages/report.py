"""`mlflow run . -e report`: the results table over every registered version,
printed and logged (results.md, results.csv) to a report run.

    python -m cifar_resnet.stages.report registry.model_name=cifar10-resnet
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from .. import registry, results, tracking
from ..config import RegistrySettings, section_settings, to_container
from . import CONF_DIR, launch, report_user_errors

# MLproject parameter -> the config key (or group) it sets; `overrides` is the rest.
PARAMETERS = {"model_name": "registry.model_name"}


@hydra.main(config_path=CONF_DIR, config_name="report", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    config = to_container(cfg)
    name = section_settings(RegistrySettings, "registry", config["registry"]).model_name
    table = results.rows(name)
    if not table:
        raise registry.RegistryError(f"model {name!r} has no versions; train one first")
    text = results.markdown(table)
    print(f"## {name}\n\n{text}", flush=True)
    with tracking.training_run(
        config["experiment_name"],
        run_name=f"report {name}",
        tags={"model_name": name, "versions": str(len(table))},
    ) as run:
        tracking.log_text(text, "results.md")
        tracking.log_text(results.csv_text(table), "results.csv")
        print(f"logged results.md and results.csv to run {run.info.run_id}", flush=True)


if __name__ == "__main__":
    launch(main, PARAMETERS)
