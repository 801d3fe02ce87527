"""Config composition and validation: every option of every group composes into typed dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore

from tests.helpers import compose_typed
from viseg.config import (
    BaseConfig,
    PlainConvUnet2DArgs,
    ResEncUnet3DArgs,
    register_configs,
    reject_derived_overrides,
)
from viseg.errors import ConfigError
from viseg.resources import conf_dir

PRIMARY_CONFIGS = sorted(p.stem for p in conf_dir().glob("*_config.yaml"))


def group_options() -> dict[str, list[str]]:
    """Options per group from both sources: YAML files under conf/ and schemas in the ConfigStore."""
    register_configs()
    groups: dict[str, set[str]] = {}
    for folder in conf_dir().iterdir():
        if folder.is_dir() and folder.name != "hydra":
            groups.setdefault(folder.name, set()).update(p.stem for p in folder.glob("*.yaml"))
    repo = ConfigStore.instance().repo
    for name, node in repo.items():
        if isinstance(node, dict) and name not in ("hydra", "_dummy_empty_config_.yaml"):
            groups.setdefault(name, set()).update(k.removesuffix(".yaml") for k in node)
    return {g: sorted(o for o in opts if not o.startswith("base_")) for g, opts in groups.items()}


def test_primary_configs_exist():
    assert PRIMARY_CONFIGS == ["anatomy_config", "lesion_config"]


def test_groups_are_the_expected_ones():
    options = group_options()
    assert options["model"] == ["plain_conv_unet_2d", "plain_conv_unet_3d", "residual_encoder_unet_3d"]
    assert options["lr_scheduler"] == ["cosine", "plateau", "poly", "step_lr"]


@pytest.mark.parametrize("config_name", PRIMARY_CONFIGS)
def test_every_option_of_every_group_composes(config_name: str):
    composed = 0
    for group, options in group_options().items():
        for option in options:
            cfg = compose_typed(config_name, [f"{group}={option}"])
            assert isinstance(cfg, BaseConfig)
            composed += 1
    assert composed >= 7


def test_model_options_carry_their_dimension():
    assert isinstance(compose_typed("anatomy_config", ["model=plain_conv_unet_2d"]).model.model_args,
                      PlainConvUnet2DArgs)
    resenc = compose_typed("anatomy_config", ["model=residual_encoder_unet_3d"]).model
    assert resenc.model_cls == "ResidualEncoderUNet" and isinstance(resenc.model_args, ResEncUnet3DArgs)


def test_lesion_config_has_its_own_labels_sampling_and_loss():
    anatomy = compose_typed("anatomy_config", [])
    lesion = compose_typed("lesion_config", [])
    assert lesion.foreground_labels == [3] and anatomy.foreground_labels is None
    assert lesion.sampling.oversample_foreground_percent > anatomy.sampling.oversample_foreground_percent
    assert lesion.loss.class_weights is not None


def test_command_line_overrides_reach_typed_config():
    cfg = compose_typed("lesion_config", ["dataset.basepath=/data/x", "patch_size=[64,128,128]",
                                          "optimizer.lr=0.003", "splits.group_pattern='(patient\\d+)'"])
    assert cfg.dataset.basepath == "/data/x"
    assert cfg.patch_size == [64, 128, 128]
    assert cfg.optimizer.lr == pytest.approx(0.003)
    assert cfg.splits.group_pattern == "(patient\\d+)"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lr_scheduler.type=os.system"], "not a registered scheduler"),
        (["lr_scheduler=plateau", "lr_scheduler.monitor=null"], "monitor"),
        (["fold=5"], "out of range"),
        (["fold=-1"], "out of range"),
        (["patch_size=[0,64,64]"], "positive"),
        (["spacing=[1,-1,1]"], "positive"),
        (["batch_size=0"], "batch_size"),
        (["transpose_forward=[0,0,1]"], "permutation"),
        (["transpose_forward=[1,0,2]", "transpose_backward=[2,0,1]"], "not inverse"),
        (["foreground_labels=[0,1]"], "positive"),
        (["optimizer.type=Adagrad"], "not supported"),
        (["model.model_cls=torch.nn.Module"], "not a registered architecture"),
        (["trainer.max_epochs=0"], "max_epochs"),
        (["sampling.oversample_foreground_percent=1.5"], "oversample"),
        (["splits.n_folds=1"], "n_folds"),
        (["plan.gpu_memory_gb=0"], "gpu_memory_gb"),
    ],
)
def test_invalid_values_fail_at_composition(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        compose_typed("anatomy_config", overrides)


@pytest.mark.parametrize(
    "override",
    ["num_channels=2", "num_classes=3", "model.model_args.n_stages=4", "model.model_args.strides=[[1,1,1]]",
     "model.model_args.features_per_stage=[8,16]", "model.model_args.kernel_sizes=[[3,3,3]]",
     "model.model_args.n_conv_per_stage=[2]", "model.model_args.n_conv_per_stage_decoder=[2]"],
)
def test_derived_values_cannot_be_overridden(override: str):
    cfg = compose_typed("anatomy_config", [override])
    with pytest.raises(ConfigError, match="derived from the dataset"):
        reject_derived_overrides(cfg)


def test_plan_overrides_are_allowed():
    cfg = compose_typed("anatomy_config", ["patch_size=[16,64,64]", "spacing=[4,1,1]", "batch_size=3",
                                           "transpose_forward=[2,0,1]", "model.model_args.deep_supervision=false"])
    reject_derived_overrides(cfg)


def test_conf_dir_is_the_repository_conf():
    assert conf_dir() == Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize(
    "argv",
    [
        ["prog"],
        ["prog", "a=1", "b=2"],
        ["prog", "--config-name=lesion_config", "a=1"],
        ["prog", "a=1", "--config-name=lesion_config"],
        ["prog", "--config-name", "lesion_config", "a=1"],
        ["prog", "-cn", "lesion_config"],
        ["prog", "--help"],
        ["prog", "-m", "fold=0,1"],
    ],
)
def test_app_help_override_keeps_user_overrides_contiguous(argv: list[str]):
    from viseg.cli import with_app_help

    out = with_app_help(argv, "plan")
    positions = [i for i, a in enumerate(out[1:]) if "=" in a and not a.startswith("-")]
    assert "hydra/help=plan" in out and sorted(out) == sorted([*argv, "hydra/help=plan"])
    assert positions == list(range(positions[0], positions[0] + len(positions)))
    if "--config-name" in argv or "-cn" in argv:
        flag = "--config-name" if "--config-name" in argv else "-cn"
        assert out[out.index(flag) + 1] == "lesion_config"


def test_run_app_gives_hydra_its_arguments_and_leaves_the_callers_argv_alone(monkeypatch, tmp_path):
    """An in-process caller (a notebook, a test, another tool) keeps its own sys.argv."""
    import sys

    from viseg.cli import run_app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["caller", "--its-own-flag"])
    seen: list[int] = []
    run_app(lambda cfg: seen.append(cfg.fold) or 0, "train", argv=["fold=3"])
    assert seen == [3]
    assert sys.argv == ["caller", "--its-own-flag"]
