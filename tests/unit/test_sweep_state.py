"""The sweep's settings stay typed from the command line to sweep_state.json and back (no dicts read by key)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from viseg.errors import ConfigError
from viseg.sweep.driver import STATE_FILE, SweepPlan, load_state, save_state
from viseg.sweep.parse import parse_request
from viseg.sweep.spec import SearchAxis, SweepConfig

NO_SPECS = Path("/nonexistent-sweeps")


def plan_for(tmp_path: Path, settings: SweepConfig) -> SweepPlan:
    return SweepPlan(experiment="exp", storage_path=str(tmp_path), variants={"default": "fold: 0\n"},
                     overrides={"default": []}, folds=[0, 1], search=[SearchAxis("optimizer.lr", "loguniform", 1e-4,
                                                                                 1e-2)], settings=settings)


def test_settings_round_trip_through_the_state_file_as_the_schema_types(tmp_path: Path) -> None:
    request = parse_request(["folds=0-1", "search.mode=min", "search.metric=val/loss", "resources.gpu=0.5",
                             "num_samples=3", "optimizer.lr=tag(log, interval(1e-4, 1e-2))"], sweeps_dir=NO_SPECS)
    assert isinstance(request.settings, SweepConfig)
    (tmp_path / "exp").mkdir()
    save_state(plan_for(tmp_path, request.settings))
    loaded = load_state(tmp_path / "exp")
    assert isinstance(loaded.settings, SweepConfig) and loaded.settings == request.settings
    assert (loaded.settings.search.mode, loaded.settings.resources.gpu, loaded.settings.num_samples) == ("min", 0.5, 3)
    assert loaded.search == plan_for(tmp_path, SweepConfig()).search


def test_a_state_file_with_settings_this_viseg_does_not_know_is_named(tmp_path: Path) -> None:
    (tmp_path / "exp").mkdir()
    save_state(plan_for(tmp_path, SweepConfig()))
    state = tmp_path / "exp" / STATE_FILE
    saved = json.loads(state.read_text())
    saved["settings"]["num_samples"] = "many"
    state.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=f"sweep settings in {state}.*num_samples"):
        load_state(tmp_path / "exp")


@pytest.mark.parametrize(("override", "message"), [("search.mode=maximum", "must be max or min"),
                                                   ("search.scheduler=bohb", "not a search scheduler")])
def test_values_a_comment_used_to_list_are_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_request(["folds=0", override], sweeps_dir=NO_SPECS)


def test_the_mode_comes_from_the_typed_settings_and_two_modes_are_refused(capsys: pytest.CaptureFixture) -> None:
    from viseg.sweep.__main__ import main

    assert main(["summary=/tmp/a", "resume=/tmp/b"]) == 2
    assert "summary= and resume= are different modes" in capsys.readouterr().err


def test_a_path_setting_is_read_whole_commas_and_brackets_included(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """summary= of a folder that is no experiment: refused by name, and nothing is written there."""
    from viseg.sweep.__main__ import main

    odd = tmp_path / "no experiment (copy), 2"
    assert main([f"summary={odd}"]) == 2
    assert f"{odd} is not a sweep experiment" in capsys.readouterr().err
    assert not odd.exists()
