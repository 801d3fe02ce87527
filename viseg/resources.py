"""The configs viseg ships: `conf/` and `sweeps/`, installed as the package data viseg.conf and viseg.sweeps.

Found through importlib.resources, so a wheel, a Docker image or a Ray runtime_env `pip:` install finds them
as a source checkout does (an editable install maps the two names onto the repository's folders). A user's
own config folder comes on top through Hydra's `--config-dir`, never instead of these.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _folder(package: str) -> Path:
    # Installed wheels are unpacked on disk; a zipped install would need as_file, which viseg does not support.
    path = Path(str(files(package)))
    if not path.is_dir():
        raise FileNotFoundError(f"viseg's packaged configs {package} are not a folder on disk ({path}); "
                                "install viseg from a wheel or a source checkout, not as a zip")
    return path


def conf_dir() -> Path:
    """The Hydra config folder: the `*_config.yaml` primaries, the config groups, predict and evaluate."""
    return _folder("viseg.conf")


def sweeps_dir() -> Path:
    """The named sweep specs (`spec=<name>`), such as the demo's."""
    return _folder("viseg.sweeps")
