"""Entry points: thin Hydra apps that compose a config, type it once and call
library code. Shared here: where conf/ lives, how MLproject parameters become
Hydra overrides, and how user errors become one clear line and exit code 2."""

from __future__ import annotations

import functools
import os
import shlex
import sys
from pathlib import Path
from typing import Callable


def config_dir() -> str:
    """conf/ at the repository root (editable installs), or $CIFAR_RESNET_CONF, or ./conf."""
    if os.environ.get("CIFAR_RESNET_CONF"):
        return str(Path(os.environ["CIFAR_RESNET_CONF"]).resolve())
    beside_src = Path(__file__).resolve().parents[3] / "conf"
    return str(beside_src if beside_src.is_dir() else Path("conf").resolve())


CONF_DIR = config_dir()


def mlproject_argv(argv: list[str], aliases: dict[str, str]) -> list[str]:
    """Turn MLproject-style arguments into Hydra overrides.

    ``mlflow run`` hands every parameter over as one shell-quoted word, so
    ``overrides='a=1 b=2'`` arrives as the single argument ``overrides=a=1 b=2``
    and is split here. An alias with an empty value (the MLproject default)
    leaves the config's own value alone: a recipe's epoch count survives
    ``mlflow run`` without ``-P epochs``.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "overrides":
            out.extend(shlex.split(value))
        elif sep and key in aliases:
            if value.strip():
                out.append(f"{aliases[key]}={value}")
        else:
            out.append(arg)
    return out


AUTO_RECIPE = "auto"


def recipe_for(device) -> str:
    """The recipe ``recipe=auto`` means on ``device`` (a torch.device): ``best``
    (accuracy first, sized for a GPU) on CUDA, ``fast`` (accuracy per CPU-minute)
    on a CPU or MPS, where ``best`` would take a day or more."""
    return "best" if device.type == "cuda" else "fast"


def resolve_recipe(cfg, compose: Callable[[str], object]):
    """Replace ``recipe=auto`` by the recipe for the device ``train.device`` resolves to.

    ``compose(recipe)`` composes the same config again with ``recipe=<recipe>``.
    Returns (config, requested): ``requested`` is "auto" when a choice was made here
    (the caller prints and logs it), None when the config named its recipe.
    """
    from .. import hardware

    if cfg.get("recipe") != AUTO_RECIPE:
        return cfg, None
    device = hardware.resolve_device(str(cfg.train.device))
    return compose(recipe_for(device)), AUTO_RECIPE


def task_overrides() -> list[str]:
    """This ``@hydra.main`` app's command-line overrides, as given."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def hydra_recomposer(config_name: str) -> Callable[[str], object]:
    """For ``resolve_recipe`` inside a ``@hydra.main`` app: this run's command-line
    overrides, with its recipe replaced."""
    from hydra import compose

    overrides = [o for o in task_overrides() if not o.lstrip("+~").startswith("recipe=")]
    return lambda recipe: compose(config_name=config_name,
                                  overrides=[*overrides, f"recipe={recipe}"])


class UserError(Exception):
    """Marker base for errors whose message alone tells the user what to fix."""


def user_errors() -> tuple[type[BaseException], ...]:
    from ..config import ConfigError
    from ..data import DataError
    from ..models import UnknownModelError

    return (UserError, ConfigError, DataError, UnknownModelError)


def report_user_errors(task: Callable) -> Callable:
    """Print a known user error as one line on stderr and exit 2, with no traceback."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except user_errors() as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper


def launch(main: Callable[[], None], aliases: dict[str, str]) -> None:
    sys.argv = [sys.argv[0], *mlproject_argv(sys.argv[1:], aliases)]
    main()
