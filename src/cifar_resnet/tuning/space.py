"""The search space: conf/tune/ trees whose leaves say how to sample a config key, and
the config with a trial's values put in."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import optuna

from ..config import SEARCH_TYPES, ConfigError


@dataclasses.dataclass(frozen=True)
class Param:
    key: str  # dotted config path, also the Optuna parameter name
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def suggest(self, trial: optuna.Trial):
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


_LEAF_KEYS = {"type", "low", "high", "log", "step", "factor", "choices"}


def parse_space(space: dict | None, config: dict) -> list[Param]:
    """The conf/tune tree -> parameters, checked against the train config."""
    leaves: list[tuple[str, dict]] = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            raise ConfigError(f"tune.space.{path}: expected a mapping, got {node!r}")
        if "type" in node:
            leaves.append((path, node))
            return
        for key, child in node.items():
            walk(child, f"{path}.{key}" if path else str(key))

    walk(space or {}, "")
    if not leaves:
        raise ConfigError(
            "tune.space is empty: there is nothing to search; pick a space "
            "(tune=default or tune=seed) or add parameters under tune.space"
        )
    return [_param(key, spec, config) for key, spec in leaves]


def _param(key: str, spec: dict, config: dict) -> Param:
    where = f"tune.space.{key}"
    unknown = set(spec) - _LEAF_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(_LEAF_KEYS))}"
        )
    kind = spec["type"]
    if kind not in SEARCH_TYPES:
        raise ConfigError(f"{where}.type must be one of {', '.join(SEARCH_TYPES)}, got {kind!r}")
    current = get_dotted(config, key, where)
    if kind == "categorical":
        choices = spec.get("choices")
        if not choices:
            raise ConfigError(f"{where}: a categorical parameter needs a non-empty 'choices' list")
        return Param(key, kind, choices=tuple(choices))
    log = bool(spec.get("log", False))
    if "factor" in spec:
        factor = float(spec["factor"])
        if not isinstance(current, (int, float)) or current <= 0 or factor <= 1:
            raise ConfigError(
                f"{where}: 'factor' needs a positive config value and a factor "
                f"> 1; got value {current!r} and factor {factor}"
            )
        low, high = current / factor, current * factor
    elif "low" in spec and "high" in spec:
        low, high = float(spec["low"]), float(spec["high"])
    else:
        raise ConfigError(
            f"{where}: give 'low' and 'high', or 'factor' (around the config's value)"
        )
    if not low < high or (log and low <= 0):
        raise ConfigError(f"{where}: need low < high (and low > 0 with log), got {low}..{high}")
    return Param(key, kind, low, high, log, spec.get("step"))


def get_dotted(config: dict, key: str, where: str = "") -> Any:
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{where or key}: the config has no key {key!r}")
        node = node[part]
    return node


def with_values(config: dict, values: dict[str, Any]) -> dict:
    """A copy of ``config`` with dotted keys set (keys must exist: no silent typos)."""
    out = copy.deepcopy(config)
    for key, value in values.items():
        get_dotted(out, key)
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[last] = value
    return out
