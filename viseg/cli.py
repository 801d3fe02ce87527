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

from viseg.errors import ConfigError, VisegError

DEFAULT_CONFIG = "anatomy_config"
Task = Callable[[Any], int]


def conf_dir() -> Path:
    """`conf/` beside the package (a source checkout or editable install)."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def user_error(exc: BaseException) -> VisegError | None:
    """The VisegError behind an exception, also when OmegaConf wrapped it during `to_object`."""
    seen = exc
    while seen is not None:
        if isinstance(seen, VisegError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def to_typed(cfg: Any) -> Any:
    """Convert a composed DictConfig into `BaseConfig` (validates every section)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        found = user_error(exc)
        if found is not None:
            raise found from None
        raise ConfigError(str(exc).splitlines()[0], fix="check the override's key and type (see --help)") from None


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)


_FLAGS_WITH_VALUE = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd",
                     "--experimental-rerun"}


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
        elif not arg.startswith("-"):
            position = index
            break
    return [argv[0], *args[:position], f"hydra/help={app}", *args[position:]]


def run_app(task: Task, app: str, argv: list[str] | None = None, config_name: str = DEFAULT_CONFIG,
            register: Callable[[], None] | None = None) -> None:
    """Run `task` as the Hydra application `viseg-<app>` (help text in conf/hydra/help/<app>.yaml).

    `config_name` and `register` let a command with its own schema (python -m viseg.predict) use the same
    plumbing; by default the training schemas (BaseConfig and its groups) are registered."""
    import hydra
    from omegaconf import DictConfig

    from viseg.config import register_configs

    (register or register_configs)()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv = with_app_help(sys.argv, app)

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
    def _main(dict_cfg: DictConfig) -> None:
        configure_logging()
        try:
            code = task(to_typed(dict_cfg))
        except VisegError as exc:
            print(f"viseg {app}: error: {exc}", file=sys.stderr)
            sys.exit(2)
        if code:
            sys.exit(code)

    _main()
