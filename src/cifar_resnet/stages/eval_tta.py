"""`mlflow run . -e eval_tta`: a registered version's accuracy on the 10,000 test
images without and with test-time augmentation, logged to a run that is linked
to the version both ways, and written onto the version's tags.

    python -m cifar_resnet.stages.eval_tta eval.model_uri=models:/cifar10-resnet/3 tta=flip_shift
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from .. import engine, hardware, pipeline, plots, registry, tracking
from ..config import ConfigError, DataSettings, EvalSettings, section_settings, to_container
from ..serving import load_classifier
from ..tta import TTA_VIEWS, metric_name, tta_views
from . import CONF_DIR, launch, report_user_errors

# MLproject parameter -> the config key (or group) it sets; `overrides` is the rest.
PARAMETERS = {"model_uri": "eval.model_uri", "views": "tta"}


@hydra.main(config_path=CONF_DIR, config_name="eval_tta", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    config = to_container(cfg)
    settings = section_settings(EvalSettings, "eval", config["eval"])
    d = section_settings(DataSettings, "data", config["data"])
    views_name = config["tta"]["name"]
    if views_name not in TTA_VIEWS:
        raise ConfigError(
            f"unknown view set tta.name={views_name!r}; choose from {', '.join(TTA_VIEWS)}"
        )
    views = tta_views(views_name)
    device = hardware.resolve_device(settings.device)
    hardware.configure_threads()
    precision = hardware.resolve_precision(settings.precision, device)
    amp = hardware.autocast_dtype(precision)
    print(hardware.machine_line(device, settings.precision, precision), flush=True)
    ref = registry.require_version(registry.resolve(settings.model_uri))
    model, class_names = load_classifier(registry.download_weights(ref))
    model.to(device)
    images, labels = pipeline.load_test_set(d)

    with tracking.training_run(
        config["experiment_name"],
        run_name=f"eval_tta {ref.name} v{ref.version} {views_name}",
        tags={
            "model_name": ref.name,
            "model_version": ref.version,
            "model_uri": ref.uri,
            "tta_views": views_name,
        },
    ) as run:
        print(
            f"MLflow run {run.info.run_id}: {ref.label} on {len(labels):,} test images, "
            f"views {views_name} ({', '.join(TTA_VIEWS[views_name])})",
            flush=True,
        )
        tracking.log_config(
            config,
            {
                "model_name": ref.name,
                "model_version": ref.version,
                # not "views": mlflow run logs -P views under it
                "tta.views": ",".join(TTA_VIEWS[views_name]),
                "n_views": len(views),
                "device": str(device),
                "resolved_precision": precision,
                "hardware": hardware.describe(device),
            },
        )
        # The view set is part of every TTA name (test_acc_tta_flip_shift, ...), as in
        # training: flip and flip_shift are different measurements, never one metric.
        tta_suffix = metric_name(views_name, "")
        accuracy = {}
        for suffix, view_set in (("", None), (tta_suffix, views)):
            start = time.perf_counter()
            loss, acc, logits = engine.evaluate(
                model,
                images,
                labels,
                device,
                batch_size=settings.batch_size,
                amp_dtype=amp,
                views=view_set,
            )
            accuracy[suffix] = acc
            predictions = logits.argmax(1).numpy()
            tracking.log_metrics(
                {
                    f"test_acc{suffix}": acc,
                    f"test_loss{suffix}": loss,
                    f"eval_seconds{suffix}": time.perf_counter() - start,
                }
            )
            matrix = plots.confusion_matrix(labels, predictions, len(class_names))
            tracking.log_text(
                plots.per_class_accuracy_csv(matrix, class_names), f"per_class_accuracy{suffix}.csv"
            )
            title = f"test set, TTA {views_name}" if suffix else "test set"
            tracking.log_figure(
                plots.confusion_figure(matrix, class_names, title),
                f"plots/confusion_matrix{suffix}.png",
            )
            print(f"test_acc{suffix} {acc:.4f}", flush=True)
        tta_acc = accuracy[tta_suffix]
        # One tag pair per view set: a version evaluated with several keeps each result.
        registry.tag_version(
            ref,
            {
                f"test_acc{tta_suffix}": f"{tta_acc:.4f}",
                f"eval_tta_run_id_{views_name}": run.info.run_id,
            },
        )
    print(f"tagged {ref.label}: test_acc{tta_suffix} {tta_acc:.4f}", flush=True)


if __name__ == "__main__":
    launch(main, PARAMETERS)
