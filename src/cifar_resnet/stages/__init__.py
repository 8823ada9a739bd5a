"""Entry points: thin Hydra apps that compose a config, type it once and call
library code. Shared here: where conf/ lives, how MLproject parameters become
Hydra overrides, and how user errors become one clear line and exit code 2."""

from __future__ import annotations

import functools
import math
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError


def config_dir() -> str:
    """conf/ at the repository root (editable installs), or $CIFAR_RESNET_CONF, or ./conf."""
    if os.environ.get("CIFAR_RESNET_CONF"):
        return str(Path(os.environ["CIFAR_RESNET_CONF"]).resolve())
    beside_src = Path(__file__).resolve().parents[3] / "conf"
    return str(beside_src if beside_src.is_dir() else Path("conf").resolve())


CONF_DIR = config_dir()

# In a stage's PARAMETERS: a parameter that sets no config key but how many processes
# torchrun starts on this machine (``-P nproc=2``); see ``launch``.
NPROC = "torchrun:nproc_per_node"


def mlproject_argv(argv: list[str], aliases: dict[str, str]) -> list[str]:
    """Turn MLproject-style arguments into Hydra overrides.

    ``mlflow run`` hands every parameter over as one shell-quoted word, so
    ``storage=sqlite:///optuna.db?timeout=30`` arrives as one argument whatever its
    value holds. A named parameter (``aliases``: parameter -> the config key or group
    it sets) is never read as Hydra syntax: text reaches the config verbatim, ``${...}``
    included; an option of a config group, a number or a bool is checked here.
    ``overrides`` is Hydra syntax: a command line of overrides, split as a shell
    splits it. An empty value (the MLproject default) leaves the config's own value
    alone: a recipe's epoch count survives ``mlflow run`` without ``-P epochs``.

    Raises ParameterError, naming the ``-P``, for an option its group does not have,
    a number or bool that is not one, or ``overrides`` a shell could not split.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "overrides":
            try:
                overrides = shlex.split(value)
            except ValueError as err:  # an unclosed quote
                raise ParameterError(
                    f"cannot be split as a shell splits a command line ({err}); "
                    "it holds Hydra overrides",
                    f"overrides={value!r}",
                ) from None
            for override in overrides:
                check_group_option(override)
            out.extend(overrides)
        elif sep and key in aliases:
            if aliases[key] == NPROC:
                continue  # launch's business, not the config's
            if value.strip():
                out.append(parameter_override(key, aliases[key], value))
        else:
            check_group_option(arg)
            out.append(arg)
    return out


def check_group_option(override: str) -> None:
    """Raise ParameterError for ``group=option`` (``recipe=fsat``) naming an option that
    conf/<group>/ does not have: one line listing the options, where Hydra would print a
    screenful and exit 1. Anything else (``+``/``~`` forms, dotted keys, Hydra's
    functions, ``null``) is left to Hydra."""
    key, sep, value = override.partition("=")
    options = group_options(key) if sep else None
    if options is not None and re.fullmatch(r"\w+", value) and value not in (*options, "null"):
        raise ParameterError(f"{key}={value!r} {_one_of(key, options)}")


def group_options(key: str) -> list[str] | None:
    """The options of config group ``key`` (conf/<key>/*.yaml); None for a key that is
    no group (``train.epochs``, ``+model.kwargs.x``, ``~recipe``)."""
    group = Path(CONF_DIR) / key
    if not re.fullmatch(r"\w+", key) or not group.is_dir():
        return None
    return sorted(p.stem for p in group.glob("*.yaml"))


def _one_of(key: str, options: list[str]) -> str:
    return f"must be one of {', '.join(options)} (the {key} group)"


def parameter_override(name: str, key: str, value: str) -> str:
    """The Hydra override for MLproject parameter ``name`` setting config ``key``
    (a key like ``tune.storage``, or a group like ``model``) to ``value``.

    Raises ParameterError when ``key`` is a group without the option ``value``, or
    holds an int, float or bool that ``value`` is not.
    """
    options = group_options(key)
    if options is not None:
        if value.strip() not in options:
            raise ParameterError(_one_of(key, options), f"{name}={value!r}")
        return f"{key}={value.strip()}"
    from ..config import key_type

    kind, text = key_type(key), value.strip()
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ParameterError(f"must be true or false (it sets {key})", f"{name}={value!r}")
        return f"{key}={text.lower()}"
    if kind is int:
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise ParameterError(f"must be an integer (it sets {key})", f"{name}={value!r}")
        return f"{key}={int(text)}"
    if kind is float:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isnan(number):
            raise ParameterError(f"must be a number (it sets {key})", f"{name}={value!r}")
        return f"{key}={number!r}"
    return f"{key}={hydra_quoted(value)}"


def hydra_quoted(text: str) -> str:
    """``text`` as a quoted Hydra override value that the composed config resolves back
    to ``text`` exactly, whatever characters it holds (``= , ' " [ ] { } ( )``, spaces,
    backslashes, ``${...}``)."""
    # OmegaConf reads ${ as an interpolation unless escaped as \${; the backslashes
    # right before it are halved, so they are doubled first.
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    # Inside Hydra's '...', a quote is escaped as \' and the backslashes right before a
    # quote (or before the closing one) are halved; backslashes elsewhere are literal.
    text = re.sub(r"(\\*)('|\Z)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return f"'{text}'"


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
    # Only the kind of device picks the recipe; whether this machine has it is checked
    # when training starts (a missing GPU is one line there).
    return compose(recipe_for(hardware.requested_device(str(cfg.train.device)))), AUTO_RECIPE


def task_overrides() -> list[str]:
    """This ``@hydra.main`` app's command-line overrides, as given."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    # Hydra keeps them in a config node: reading it plainly would resolve a value's
    # escaped \${...} into an interpolation that the next compose then expands.
    return list(OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False))


def hydra_recomposer(config_name: str) -> Callable[[str], object]:
    """For ``resolve_recipe`` inside a ``@hydra.main`` app: this run's command-line
    overrides, with its recipe replaced."""
    return recomposer(config_name, task_overrides())


def recomposer(config_name: str, overrides: list[str]) -> Callable[[str], object]:
    """For ``resolve_recipe``: ``config_name`` composed again with ``overrides`` and the
    recipe it is given in place of theirs. Needs Hydra initialised (``@hydra.main`` or
    ``initialize_config_dir``)."""
    from hydra import compose

    others = [o for o in overrides if not o.lstrip("+~").startswith("recipe=")]
    return lambda recipe: compose(config_name=config_name, overrides=[*others, f"recipe={recipe}"])


class ParameterError(UserError):
    """An MLproject parameter (``-P name=value``) whose value its config key cannot take.

    ``parameter`` is the ``name=value`` at fault, put before ``message`` ("" when the
    fault is no one parameter's); ``str()`` names it as ``mlflow run`` users type it (``-P``),
    ``as_typed(mlflow_run=False)`` as ``python -m cifar_resnet.stages...`` users do.
    """

    def __init__(self, message: str, parameter: str = ""):
        self.message, self.parameter = message, parameter
        super().__init__(self.as_typed(mlflow_run=True))

    def as_typed(self, mlflow_run: bool) -> str:
        if not self.parameter:
            return self.message
        return f"{'-P ' if mlflow_run else ''}{self.parameter} {self.message}"


def report_user_errors(task: Callable) -> Callable:
    """Print a known user error as one line on stderr and exit 2, with no traceback. A
    Ctrl-C the stage has not reported itself (one during its start-up, before it has a
    run to close) is one line and exit code 130, also without a traceback."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr, flush=True)
            raise SystemExit(130) from None

    return wrapper


def launch(
    main: Callable[[], None],
    aliases: dict[str, str],
    preflight: Callable[[list[str], int], None] | None = None,
) -> None:
    """Run a stage's ``@hydra.main`` with its MLproject parameters (``aliases``:
    parameter -> config key or group) turned into overrides; a bad parameter is one
    line on stderr and exit code 2.

    A parameter mapped to ``NPROC`` (``nproc=N``) with N > 1 replaces this process by
    ``python -m torch.distributed.run --standalone --nproc_per_node=N -m <this stage>``
    with the other arguments, so ``mlflow run . -e train -P nproc=2`` trains with two
    processes (under ``mlflow run``'s run: rank 0 logs into it); empty or 1 runs here.
    ``preflight(overrides, N)`` runs first: a UserError it raises (a setting every
    process would refuse alike) is one line here, not N lines under torchrun's traceback.
    """
    try:
        if NPROC not in aliases.values() and int(os.environ.get("WORLD_SIZE") or 1) > 1:
            # Each process would make its own run (tune: its own trials, each read alone).
            raise ParameterError(
                "this stage runs in one process; under torchrun only train shares its work "
                "(several tune workers share a study instead: docs/scaling.md)"
            )
        nproc, args = processes_wanted(sys.argv[1:], aliases)
        argv = mlproject_argv(args, aliases)
    except ParameterError as err:
        # mlflow run sets MLFLOW_RUN_ID for its entry point; without it, the arguments
        # were typed after python -m and carry no -P.
        typed = err.as_typed(mlflow_run=bool(os.environ.get("MLFLOW_RUN_ID")))
        print(f"error: {typed}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if nproc > 1:
        try:
            if preflight is not None:
                preflight(argv, nproc)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        module = sys.modules["__main__"].__spec__.name  # the stage, run as python -m
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *torchrun, "-m", module, *args])
    sys.argv = [sys.argv[0], *argv]
    main()


def processes_wanted(argv: list[str], aliases: dict[str, str]) -> tuple[int, list[str]]:
    """(processes to start, ``argv`` without the ``NPROC`` parameter): 1 when it is
    absent or empty.

    Raises ParameterError for a value that is not a positive integer, or for one over 1
    inside a process torchrun started (WORLD_SIZE set), which would start N more."""
    names = {name for name, key in aliases.items() if key == NPROC}
    nproc, rest = 1, []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if not (sep and name in names):
            rest.append(arg)
        elif value.strip():
            if not re.fullmatch(r"[0-9]+", value.strip()) or int(value) < 1:
                raise ParameterError(
                    "must be a positive integer (the processes torchrun starts on this machine)",
                    f"{name}={value!r}",
                )
            nproc = int(value)
    if nproc > 1 and "WORLD_SIZE" in os.environ:
        raise ParameterError(
            f"nproc={nproc} inside a process torchrun started: give torchrun "
            "--nproc_per_node instead"
        )
    return nproc, rest
