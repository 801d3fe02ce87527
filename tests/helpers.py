"""Helpers shared by tests: compose typed configs exactly as the command lines do."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from viseg.cli import to_typed
from viseg.config import BaseConfig, register_configs
from viseg.resources import conf_dir


def compose_typed(config_name: str = "anatomy_config", overrides: list[str] | None = None) -> BaseConfig:
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
        return to_typed(compose(config_name, overrides=list(overrides or [])))
