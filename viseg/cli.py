"""Shared plumbing for the Hydra command lines (`python -m viseg.plan`, `viseg.verify`, ...).

Each command composes `conf/<config-name>.yaml` over the ConfigStore schemas, converts it once to the
typed config (`BaseConfig`, or a command's own schema such as `PredictConfig`; running all validation), and
calls a task that only sees typed objects. Errors caused by user input print as one readable message (no
traceback) and exit with status 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from viseg.config import register_configs
from viseg.errors import ConfigError, VisegError, free_space_then, is_storage_full, storage_full, unwritable_file
from viseg.resources import conf_dir

DEFAULT_CONFIG = "anatomy_config"
Task = Callable[[Any], int]


def user_error(exc: BaseException) -> VisegError | None:
    """The VisegError behind an exception, also when OmegaConf wrapped it during `to_object`; a full disk
    anywhere is the user's to fix too (it names the file that could not be written)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, VisegError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if is_storage_full(exc):
        return storage_full("files", Path(unwritable_file(exc) or "."),
                            fix=free_space_then("run the same command again"))
    return None


def exit_status(command: str, run: Callable[[], int]) -> int:
    """`run()`'s status, or 2 with `viseg <command>: error: ...` (the fix included) for the user's errors; any
    other exception is a bug and keeps its traceback."""
    try:
        return run()
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        print(f"viseg {command}: error: {error}", file=sys.stderr)
        return 2


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys of a composed config that its schema does not define. Hydra's `+key=value` appends them past
    the struct flag and `OmegaConf.to_object` would set them as stray attributes, so a misspelt key, or a
    `_target_` import path, would otherwise pass in silence."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    object_type = OmegaConf.get_type(node)
    names = {f.name for f in dataclasses.fields(object_type)} if dataclasses.is_dataclass(object_type) else None
    found: list[str] = []
    for key in node:
        if names is not None and key not in names:
            found.append(f"{prefix}{key}")
        elif not OmegaConf.is_missing(node, key) and isinstance(child := node[key], DictConfig):
            found += unknown_keys(child, f"{prefix}{key}.")
    return found


def to_typed(cfg: Any) -> Any:
    """Convert a composed DictConfig into `BaseConfig` (validates every section)."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        extra = unknown_keys(cfg) if isinstance(cfg, DictConfig) else []
        if extra:
            raise ConfigError(f"{', '.join(extra)}: not a key of viseg's config schema",
                              fix="remove the override: viseg takes only the keys its schema defines, and names "
                                  "resolve through its registries, never through import paths or _target_")
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        found = user_error(exc)
        if found is not None:
            raise found from None
        raise ConfigError(str(exc).splitlines()[0], fix="check the override's key and type (see --help)") from None


def hydra_error(exc: BaseException, app: str) -> ConfigError:
    """One of Hydra's composition errors (unknown key or group option, wrong type, bad grammar) as a viseg
    message with a fix. Hydra's own advice for an unknown key, a `+key=` append, would only fail later."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, OverrideParseException):
        return _override_syntax_error(exc)
    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        options = [o for o in exc.options if not o.startswith("base_")]
        return ConfigError(f"{group}={option}: {option!r} is not an option of the config group {group}",
                           fix=f"use one of {options}")
    message = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        message += f": {str(cause).strip().splitlines()[0]}"
    key = getattr(cause, "full_key", None)
    if key:
        fix = f"check {key}: its name and type are in viseg's schema (python -m viseg.{app} --cfg job lists them)"
    else:
        fix = f"check the overrides against python -m viseg.{app} --help"
    return ConfigError(message, fix=fix)


_GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def _override_syntax_error(exc: Any) -> ConfigError:
    """An override Hydra cannot parse. A character its unquoted values do not take (a non-ASCII letter in a
    path, a bracket, a parenthesis) is the common case, and the fix is the same override, quoted."""
    lines = str(exc.message).splitlines() or [""]
    caret = lines[1].find("^") if len(lines) > 1 else -1
    if lines[0].startswith("LexerNoViableAltException") and 0 <= caret < len(lines[0]):
        key, _, value = exc.override.partition("=")
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        return ConfigError(f"{exc.override}: the character {lines[0][caret]!r} must be quoted in an override",
                           fix=f"quote the value: \"{key}='{quoted}'\" (Hydra's override grammar: {_GRAMMAR})")
    return ConfigError(f"{exc.override}: {lines[0]}", fix=f"check the override's syntax ({_GRAMMAR})")


def quote_values(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """Quote the values of `keys` (paths): Hydra reads an unquoted `a,b` as a sweep over a and b, and
    stumbles over characters such as parentheses that paths may hold. A value already quoted is kept."""
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in keys and value and value[0] not in "'\"":
            quote = "'" if "'" not in value else '"'
            arg = f"{key}={quote}{value}{quote}"
        quoted.append(arg)
    return quoted


# Keys the command line spells otherwise than the schema: `from` is a Python keyword, so no dataclass field can
# be named plan.from, which is what users of nnU-Net's "transfer the plans" step look for.
KEY_ALIASES = {"plan.from": "plan.from_model"}


def with_key_aliases(argv: list[str]) -> list[str]:
    """Overrides with each alias replaced by the schema's key (`+`/`++`/`~` prefixes kept)."""
    out = []
    for arg in argv:
        body = arg.lstrip("+~")
        key, sep, value = body.partition("=")
        if key in KEY_ALIASES:
            arg = f"{arg[:len(arg) - len(body)]}{KEY_ALIASES[key]}{sep}{value}"
        out.append(arg)
    return out


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)


_FLAGS_WITH_VALUE = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd",
                     "--experimental-rerun", "--cfg", "-c", "--package", "-p"}
# --info takes an optional value: the next argument is its value only when it is one of these
_INFO_FLAGS, _INFO_VALUES = {"--info", "-i"}, {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def with_app_help(argv: list[str], app: str) -> list[str]:
    """argv with `hydra/help=<app>` placed next to the user's overrides: Hydra's parser needs all
    overrides in one run, whether they come before or after `--config-name`."""
    args = argv[1:]
    position, skip_next = len(args), False
    for index, arg in enumerate(args):
        if skip_next:
            skip_next = False
        elif arg in _FLAGS_WITH_VALUE:
            skip_next = True
        elif arg in _INFO_FLAGS:
            skip_next = index + 1 < len(args) and args[index + 1] in _INFO_VALUES
        elif not arg.startswith("-"):
            position = index
            break
    return [argv[0], *args[:position], f"hydra/help={app}", *args[position:]]


def run_app(task: Task, app: str, argv: list[str] | None = None, config_name: str = DEFAULT_CONFIG,
            register: Callable[[], None] | None = None) -> None:
    """Run `task` as the Hydra application `viseg-<app>` (help text in conf/hydra/help/<app>.yaml).

    `config_name` and `register` let a command with its own schema (python -m viseg.predict) use the same
    plumbing; by default the training schemas (BaseConfig and its groups) are registered."""

    (register or register_configs)()
    # hydra.main reads its arguments from sys.argv alone: set them for the call, then put the caller's back
    caller_argv = sys.argv
    given = [caller_argv[0], *argv] if argv is not None else list(caller_argv)
    sys.argv = with_app_help([given[0], *with_key_aliases(given[1:])], app)
    try:
        _run_task(task, app, config_name)
    finally:
        sys.argv = caller_argv


def _run_task(task: Task, app: str, config_name: str) -> None:
    import hydra
    from omegaconf import DictConfig

    started = False

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
    def _main(dict_cfg: DictConfig) -> None:
        nonlocal started
        started = True
        configure_logging()
        try:
            code = task(to_typed(dict_cfg))
        except Exception as exc:
            error = user_error(exc)
            if error is None:
                raise
            print(f"viseg {app}: error: {error}", file=sys.stderr)
            sys.exit(2)
        if code:
            sys.exit(code)

    _run_reporting_composition_errors(_main, app, lambda: started)


def _run_reporting_composition_errors(main: Callable[[], None], app: str, started: Callable[[], bool]) -> None:
    """Run Hydra's main so that an error composing the config prints like every other user error.

    HYDRA_FULL_ERROR=1 makes Hydra raise instead of printing its own message; errors once the task has
    started are the task's (a bug keeps its traceback). A user who set HYDRA_FULL_ERROR gets Hydra's way."""
    import os

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    previous = os.environ.get("HYDRA_FULL_ERROR")
    if previous == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as exc:
        if started():
            raise
        print(f"viseg {app}: error: {hydra_error(exc, app)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
