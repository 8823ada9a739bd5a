"""The model registry as the hand-off between stages: which version a model URI
names, its weights, its metrics, and the aliases that say which one is served.

Over 300 lines on purpose: every lookup and the promotion rules read the same
versions and tags, and belong together.

train and finetune register versions; eval_tta, promote and report read them
and write tags and aliases. Every lookup that can fail on user input raises
``RegistryError`` with a message that says what exists instead.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .errors import UserError

_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_MODELS_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[^/]+)$")
_RUNS = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")
URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version> or runs:/<run_id>/<path>"


class RegistryError(UserError):
    """A model URI, version, alias or metric that the registry does not hold."""


@dataclass(frozen=True)
class ModelRef:
    """What a model URI resolved to. ``name``/``version`` are None for a run's
    model that was never registered."""

    uri: str
    run_id: str
    name: str | None = None
    version: str | None = None

    @property
    def download_uri(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else self.uri

    @property
    def label(self) -> str:
        return f"{self.name} version {self.version}" if self.version else self.uri

    def lineage_tags(self) -> dict[str, str]:
        """Tags that say where a model came from, for the run and version made from it."""
        tags = {"source_model_uri": self.uri, "source_run_id": self.run_id}
        if self.version:
            tags.update(source_model_name=self.name, source_model_version=self.version)
        return tags


def client() -> MlflowClient:
    return MlflowClient()


def _not_found(err: MlflowException) -> bool:
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def registered_model(name: str) -> Any:
    try:
        return client().get_registered_model(name)
    except MlflowException as err:
        if not _not_found(err):
            raise
        known = sorted(m.name for m in client().search_registered_models())
        raise RegistryError(
            f"no registered model {name!r}; registered models: "
            f"{', '.join(known) or 'none (train one first)'}"
        ) from None


def versions(name: str) -> list[Any]:
    """Every version of ``name``, oldest first."""
    registered_model(name)
    found = client().search_model_versions(f"name = '{name}'")
    return sorted(found, key=lambda v: int(v.version))


def aliases(name: str) -> dict[str, str]:
    """alias -> version (search results do not carry aliases; the registered model does)."""
    return {alias: str(version) for alias, version in registered_model(name).aliases.items()}


def resolve(uri: str) -> ModelRef:
    """A models:/ or runs:/ URI -> the version (and run) it names."""
    uri = uri.strip()
    if match := _MODELS_ALIAS.match(uri):
        name, alias = match["name"], match["alias"]
        known = aliases(name)
        if alias not in known:
            listed = ", ".join(f"{a} (version {v})" for a, v in sorted(known.items()))
            raise RegistryError(
                f"model {name!r} has no alias {alias!r}; its aliases: "
                f"{listed or 'none (run promote first)'}"
            )
        return _version_ref(uri, name, known[alias])
    if match := _MODELS_VERSION.match(uri):
        name, version = match["name"], match["version"]
        numbers = [str(v.version) for v in versions(name)]
        if version == "latest" and numbers:
            version = numbers[-1]
        if version not in numbers:
            raise RegistryError(
                f"model {name!r} has no version {version!r}; its versions: "
                f"{', '.join(numbers) or 'none'}"
            )
        return _version_ref(uri, name, version)
    if match := _RUNS.match(uri):
        run_id = match["run_id"]
        try:
            client().get_run(run_id)
        except MlflowException as err:
            if not _not_found(err):
                raise
            raise RegistryError(
                f"no MLflow run {run_id!r} (from {uri}) in this tracking store "
                f"({mlflow.get_tracking_uri()})"
            ) from None
        # The run's model may be registered: use the version, so lineage names it.
        registered = list(client().search_model_versions(f"run_id = '{run_id}'"))
        if len(registered) == 1:
            return ModelRef(uri, run_id, registered[0].name, str(registered[0].version))
        return ModelRef(uri, run_id)
    raise RegistryError(f"model_uri must be {URI_FORMS}; got {uri!r}")


def _version_ref(uri: str, name: str, version: str) -> ModelRef:
    return ModelRef(uri, client().get_model_version(name, version).run_id, name, version)


def require_version(ref: ModelRef) -> ModelRef:
    if not ref.version:
        raise RegistryError(
            f"{ref.uri} is not a registered model version; register it "
            "(train or finetune do) and pass models:/<name>/<version>"
        )
    return ref


def download_weights(ref: ModelRef, dst: Path | None = None) -> Path:
    """The weights file inside a logged cifar_resnet model (see serving.save_weights)."""
    from mlflow.models import Model

    from .serving import WEIGHTS_ARTIFACT  # here: serving imports torch, promote needs none

    dst = Path(dst or tempfile.mkdtemp(prefix="cifar_resnet_model_"))
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=ref.download_uri, dst_path=str(dst))
        )
        artifacts = Model.load(str(local)).flavors["python_function"].get("artifacts", {})
    except (MlflowException, OSError, KeyError) as err:
        raise RegistryError(f"could not load the model at {ref.uri}: {err}") from None
    if WEIGHTS_ARTIFACT not in artifacts:
        raise RegistryError(
            f"{ref.uri} has no {WEIGHTS_ARTIFACT!r} artifact: not a model logged by this project"
        )
    return local / artifacts[WEIGHTS_ARTIFACT]["path"]


def tag_version(ref: ModelRef, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client().set_model_version_tag(ref.name, ref.version, key, str(value))


# --------------------------------------------------------------------------- metrics


# A TTA accuracy's name carries its view set, as tta.metric_name builds it (not imported:
# that is torch, and promote and report need none).
TTA_PREFIX = "test_acc_tta_"
# The name before it did: runs and versions written then hold a bare test_acc_tta, with
# the set beside it (eval_tta's tta_views tag, train's train.tta param).
_LEGACY_TTA = "test_acc_tta"


def run_metrics(run_id: str) -> dict[str, float]:
    """The run's latest value of each metric (the last epoch's, for per-epoch ones)."""
    try:
        return dict(client().get_run(run_id).data.metrics)
    except MlflowException:
        return {}


def version_metric(
    version: Any, metric: str, metrics: dict[str, float] | None = None
) -> float | None:
    """A version's ``metric`` as a finite float, or None where it has none: its tag
    (what train and eval_tta write), else its source run's metric of that name
    (``metrics``, when the caller has them). ``test_acc_tta_<views>`` is also found in
    a result written before the name carried its view set (see ``tta_accuracies``)."""
    value = _finite(version.tags.get(metric))
    if value is not None:
        return value
    if metrics is None:
        metrics = run_metrics(version.run_id)
    value = _finite(metrics.get(metric))
    if value is None and metric.startswith(TTA_PREFIX):
        value = tta_accuracies(version, metrics).get(metric[len(TTA_PREFIX) :])
    return value


def tta_accuracies(version: Any, metrics: dict[str, float] | None = None) -> dict[str, float]:
    """View set name -> the version's test accuracy with that set's TTA, from its tags
    ``test_acc_tta_<views>`` (eval_tta, train) and else its run's metrics of those names
    (``metrics``, when the caller has them).

    A bare ``test_acc_tta`` from before the names carried the set counts under the set
    it was measured with: the version's ``tta_views`` tag (eval_tta) or its run's
    ``train.tta`` param (train); without one it is left out rather than guessed.
    """
    if metrics is None:
        metrics = run_metrics(version.run_id)
    found: dict[str, float] = {}
    for source in (version.tags, metrics):  # a tag wins over its run's metric
        for key, raw in source.items():
            value = _finite(raw)
            if key.startswith(TTA_PREFIX) and value is not None:
                found.setdefault(key[len(TTA_PREFIX) :], value)
    legacy_tag = _finite(version.tags.get(_LEGACY_TTA))
    if legacy_tag is not None and version.tags.get("tta_views"):
        found.setdefault(version.tags["tta_views"], legacy_tag)
    legacy_metric = _finite(metrics.get(_LEGACY_TTA))
    if legacy_metric is not None:
        views = _run_param(version.run_id, "train.tta")
        if views and views != "none":
            found.setdefault(views, legacy_metric)
    return found


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _run_param(run_id: str, key: str) -> str | None:
    try:
        return client().get_run(run_id).data.params.get(key)
    except MlflowException:
        return None


# --------------------------------------------------------------------------- promotion


@dataclass(frozen=True)
class Promotion:
    name: str
    metric: str
    version: str
    value: float | None
    champion: str | None  # the version that held the alias before
    champion_value: float | None
    changed: bool
    reason: str


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def check_selection_metric(metric: str, allow_test_selection: bool = False) -> None:
    """Raise RegistryError for a metric that promote must not rank versions by: any
    ``test_*`` metric unless ``allow_test_selection``, and ``test_acc_tta``, which
    names no view set (versions evaluated with different sets would be one metric)."""
    # Refused either way: checked first, so the other refusal never offers a way out.
    if metric in (_LEGACY_TTA, "test_loss_tta"):
        raise RegistryError(
            f"{metric} names no view set, so versions evaluated with "
            f"different sets would be compared as one metric; use "
            f"{metric}_<views> ({metric}_flip, {metric}_flip_shift, ...)"
        )
    if metric.startswith("test_") and not allow_test_selection:
        raise RegistryError(
            f"promote.metric={metric} is measured on the test set: choosing the champion on "
            "it is choosing on the data we report on, and the reported test figure would no "
            "longer be an honest estimate; rank by val_acc (the default), or set "
            "promote.allow_test_selection=true to do it anyway"
        )


def promote(
    name: str,
    metric: str = "val_acc",
    version: str | None = None,
    force: bool = False,
    alias: str = "champion",
    previous_alias: str = "previous",
    allow_test_selection: bool = False,
) -> Promotion:
    """Point ``alias`` at ``version`` (or the best version by ``metric``, higher is
    better); the former holder gets ``previous_alias``. A candidate worse than the
    current holder, or one that cannot be compared, needs ``force``.

    Raises RegistryError, before anything changes, for a ``test_*`` metric unless
    ``allow_test_selection`` (see ``check_selection_metric``), an unknown model or
    version, no version holding ``metric``, and a refused candidate."""
    check_selection_metric(metric, allow_test_selection)
    all_versions = {str(v.version): v for v in versions(name)}
    if not all_versions:
        raise RegistryError(f"model {name!r} has no versions; train one first")
    values = {number: version_metric(v, metric) for number, v in all_versions.items()}
    if version is not None:
        version = str(version)
        if version not in all_versions:
            raise RegistryError(
                f"model {name!r} has no version {version!r}; its versions: "
                f"{', '.join(all_versions)}"
            )
        chosen, why = version, "requested"
    else:
        scored = [(value, int(number)) for number, value in values.items() if value is not None]
        if not scored:
            raise RegistryError(
                f"no version of {name!r} has {metric!r} as a tag or a run "
                "metric (train writes val_acc, eval_tta "
                "test_acc_tta_<views>)"
            )
        best_value, best_number = max(scored)  # ties: the newest
        chosen = str(best_number)
        unscored = len(all_versions) - len(scored)
        why = f"best {metric} of {len(scored)} version(s)" + (
            f"; {unscored} without {metric} left out" if unscored else ""
        )
    value = values[chosen]
    champion = aliases(name).get(alias)
    champion_value = values.get(champion) if champion else None

    def result(changed: bool, reason: str) -> Promotion:
        return Promotion(name, metric, chosen, value, champion, champion_value, changed, reason)

    if champion == chosen:
        return result(
            False,
            f"version {chosen} ({why}, {metric} {_fmt(value)}) already is {alias!r}; nothing to do",
        )
    if champion is not None and not force:
        if value is None:
            raise RegistryError(
                f"version {chosen} has no {metric!r}, so it cannot be compared "
                f"with {alias} version {champion}; not promoted "
                "(force=true promotes it anyway)"
            )
        if champion_value is not None and value < champion_value:
            raise RegistryError(
                f"version {chosen} has {metric} {_fmt(value)}, worse than "
                f"{alias} version {champion} ({_fmt(champion_value)}); "
                "not promoted (force=true promotes it anyway)"
            )
    c = client()
    if champion is not None:
        c.set_registered_model_alias(name, previous_alias, champion)
    c.set_registered_model_alias(name, alias, chosen)
    if champion is None:
        reason = f"no {alias} yet"
    elif value is not None and champion_value is not None and value < champion_value:
        reason = f"forced although worse than version {champion} ({_fmt(champion_value)})"
    elif champion_value is None:
        reason = f"version {champion} has no {metric} to compare with"
    else:
        relation = "better than" if value > champion_value else "as good as"
        reason = f"{relation} version {champion} ({_fmt(champion_value)})"
    return result(
        True,
        f"{alias} -> version {chosen} ({why}, {metric} {_fmt(value)}): {reason}"
        + (f"; version {champion} is now {previous_alias!r}" if champion else ""),
    )
