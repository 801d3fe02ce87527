"""Turn `python -m viseg.sweep` arguments (and an optional sweep spec) into a SweepRequest.

Hydra's own override grammar does the parsing: `a,b`, `range()` and `choice()` are grid axes;
`interval()` (optionally `tag(log, ...)`) and `tag(search, choice(...))` are searched by Optuna; plain
`key=value` overrides apply to every trial. Keys the sweep itself owns (folds, resources, ...) are
settings, not training overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from viseg.cli import to_typed
from viseg.errors import ConfigError
from viseg.resources import conf_dir
from viseg.sweep.spec import (
    SWEEP_KEYS,
    UNSEARCHABLE_PREFIXES,
    Axis,
    SearchAxis,
    SweepConfig,
    SweepRequest,
    load_spec,
)


def _parse(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        first_lines = " ".join(str(exc).splitlines()[:2])
        raise ConfigError(first_lines, fix="see `python -m viseg.sweep --help` for the override grammar") from None


def _is_sweep_key(key: str) -> bool:
    return key.split(".")[0] in SWEEP_KEYS


def _setting_value(override: Any) -> Any:
    if override.is_sweep_override():
        return [int(v) if v.lstrip("-").isdigit() else v for v in override.sweep_string_iterator()]
    return override.value()


def _search_axis(override: Any) -> SearchAxis:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep

    key, value = override.key_or_group, override.value()
    if key.startswith(UNSEARCHABLE_PREFIXES):
        raise ConfigError(f"{key} cannot be searched: it changes the plan or the data, which all trials of a "
                          "search share", fix=f"make {key} a grid axis ({key}=a,b) or fix it")
    if _is_config_group(key):
        raise ConfigError(f"{key} is a config group: its options are variants, not a searched value",
                          fix=f"list them as a grid axis ({key}=a,b); beside searched ranges Optuna picks among them")
    if isinstance(value, IntervalSweep):
        kind = "loguniform" if "log" in value.tags else "uniform"
        return SearchAxis(key, kind, low=float(value.start), high=float(value.end))
    if isinstance(value, ChoiceSweep):
        return SearchAxis(key, "choice", choices=tuple(value.list))
    raise ConfigError(f"{override.input_line} is not a searchable range", fix="use interval(a, b) or choice(...)")


def _update_setting(settings: Any, override: Any) -> None:
    """A sweep setting, type-checked by SweepConfig's schema; any failure is the user's typo, said once."""
    from omegaconf import OmegaConf

    try:
        OmegaConf.update(settings, override.key_or_group, _setting_value(override), merge=True)
    except Exception as exc:  # OmegaConf validation and Hydra sweep errors: both mean a bad value here
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"sweep setting {override.input_line!r} is invalid: {detail}",
                          fix="see `python -m viseg.sweep --help` for the sweep settings and their types") from None


def _is_config_group(key: str) -> bool:

    return (conf_dir() / key.split("/")[0]).is_dir() and "." not in key


def _is_search(override: Any) -> bool:
    from hydra.core.override_parser.types import IntervalSweep

    value = override.value()
    return isinstance(value, IntervalSweep) or "search" in getattr(value, "tags", set())


def _spec_overrides(spec: dict[str, Any]) -> list[str]:
    """A spec's grid axes and search space as override strings, parsed like the command line."""
    lines = [f"{key}={','.join(map(str, values))}" for key, values in (spec.pop("axes", None) or {}).items()]
    lines += [f"{key}={expr}" for key, expr in (spec.pop("search_space", None) or {}).items()]
    return lines + list(spec.pop("overrides", None) or [])


def parse_request(args: list[str], sweeps_dir: Path, default_spec: str | None = None) -> SweepRequest:
    """Command-line overrides win over the spec file's values, key by key."""
    from omegaconf import OmegaConf

    parsed = _parse(args)
    spec_name = next((o.value() for o in parsed if o.key_or_group == "sweep"), default_spec)
    spec = load_spec(spec_name, sweeps_dir) if spec_name else {}
    spec_lines = _spec_overrides(spec)
    cli_keys = {o.key_or_group for o in parsed}
    merged = [o for o in _parse(spec_lines) if o.key_or_group not in cli_keys] + parsed

    settings = OmegaConf.merge(OmegaConf.structured(SweepConfig), spec, {"sweep": spec_name})
    fixed: list[str] = []
    axes: list[Axis] = []
    search: list[SearchAxis] = []
    for override in merged:
        key = override.key_or_group
        if _is_sweep_key(key):
            _update_setting(settings, override)
        elif override.is_sweep_override():
            if _is_search(override):
                search.append(_search_axis(override))
            else:
                axes.append(Axis(key, tuple(override.sweep_string_iterator())))
        else:
            fixed.append(override.input_line)
    typed: SweepConfig = to_typed(settings)
    return SweepRequest(settings=typed, fixed=fixed, axes=axes, search=search)
