"""Trained runs -> an ensemble of networks, ready for `viseg.predict`.

Runs that share a configuration and a plan form one group, whose networks' probabilities are averaged on the
plan's preprocessed grid. Runs of several groups (nnU-Net's 2d + 3d_fullres ensembles, or plans that differ in
a patch size) are allowed when they agree on the input channels and on what each output means: every group
then predicts in the image's own geometry and the groups' probabilities are averaged, each group weighing the
same (nnU-Net's nnUNetv2_ensemble).

`model=` takes a run folder (it holds config.yaml), a comma list of run folders, a sweep experiment folder
(`<experiment>/runs/<dataset>/<plan>/<variant>/fold_<k>/`), whose finished folds of one variant form the
ensemble, a model.zip of `viseg export-model`, or a trained nnU-Net v2 model folder (`inference.nnunet_model`).
Everything is read from the checkpoints themselves (their config and plan travel with the weights; an nnU-Net
model's plan is its plans.json), loaded with `torch.load(weights_only=True)`: a checkpoint is data, never code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viseg.cli import to_typed
from viseg.config import BaseConfig
from viseg.data.labels import Region, is_label_or_region
from viseg.errors import ConfigError
from viseg.inference import nnunet_model
from viseg.io.jsonio import read_json
from viseg.io.layout import (
    EXPERIMENT_RUNS,
    FINISHED_MARKER,
    PREVIOUS_STAGE_DIR,
    WEIGHTS,
    WEIGHTS_HELP,
    is_run_dir,
    weights_file,
)
from viseg.io.layout import experiment_variants as layout_variants
from viseg.io.model_archive import is_archive, open_archive
from viseg.planning.plans import Plans, plans_from_dict

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

POSTPROCESSING_FILE = "postprocessing.json"


@dataclass(frozen=True)
class Postprocessing:
    """postprocessing.json (written by model selection): labels whose largest connected component alone is
    kept, nnU-Net's remove_all_but_largest_component."""

    largest_component_labels: tuple[Region, ...]  # label values, or regions (tuples) of a region model
    source: Path

    @classmethod
    def load(cls, path: Path) -> Postprocessing:
        try:
            raw = read_json(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}", fix="rewrite it as valid JSON") from None
        labels = raw.get("largest_component_labels") if isinstance(raw, dict) else None
        if not isinstance(labels, list) or not all(map(is_label_or_region, labels)):
            raise ConfigError(f"{path} must hold {{\"largest_component_labels\": [<label values>]}}, got {raw!r}",
                              fix="list integer label values, e.g. {\"largest_component_labels\": [1, 3]} (a "
                                  "region model's regions as lists: [[1, 2, 3], 3])")
        return cls(tuple(tuple(v) if isinstance(v, list) else v for v in labels), path)


@dataclass(frozen=True)
class ModelSelection:
    """What `model=` (and `variant=`) name: the run folders and the postprocessing that goes with them."""

    run_dirs: tuple[Path, ...]
    postprocessing: Postprocessing | None


@dataclass
class Ensemble:
    """Networks of one plan, in eval mode on one device. Class k of their output is label value
    `label_values[k]` (0 for background).

    An ensemble of several groups (configurations or plans) holds each as a one-group Ensemble in `groups`;
    its own plans, configuration, mirror axes, pathfinder and file ending are then the first group's (the
    groups agree on channels and labels, which is what the callers read them for), `run_dirs` and `networks`
    all groups', in group order, and `previous` is None (each cascade group holds its own)."""

    run_dirs: list[Path]
    networks: list[nn.Module]
    plans: Plans
    configuration: str
    mirror_axes: tuple[int, ...]  # patch axes training mirrored: test-time mirroring may use only these
    device: torch.device
    pathfinder: str  # the layout the runs were trained on: how input files name their channels
    file_ending: str
    weights_file: str = ""  # where the chosen weights are, relative to each run folder (for the log)
    # a cascade's previous stage: the lowres runs its folds were trained on (each run's previous_stage/ copy),
    # predicted first, their labels then input to this ensemble
    previous: Ensemble | None = None
    # several configurations or plans: one one-group Ensemble each, whose predictions are averaged in the
    # image's geometry; empty for an ensemble of one plan
    groups: list[Ensemble] = field(default_factory=list)

    @property
    def members(self) -> list[Ensemble]:
        """The one-group ensembles whose predictions are averaged: `groups`, or this ensemble itself."""
        return self.groups or [self]

    @property
    def num_classes(self) -> int:
        return self.plans.num_classes

    @property
    def label_values(self) -> tuple[int, ...]:
        return (0, *self.plans.foreground_labels)

    @property
    def scored(self) -> tuple[Region, ...]:
        """What the model predicts, as postprocessing names it: label values, or a region model's regions."""
        return self.plans.label_encoding().scored


# -- model= -> run folders ------------------------------------------------------------------------------


def resolve_model(model: str, variant: str | None = None, folds: str | None = None,
                  checkpoint: str = "final") -> ModelSelection:
    """Run folders named by `model=`: one run folder, a comma list of them, an experiment + variant, a
    model.zip of viseg export-model, or an nnU-Net model folder (its fold folders). `folds=` narrows an
    experiment or an nnU-Net model to some folds."""
    paths = [Path(p.strip()).expanduser() for p in model.split(",") if p.strip()]
    if not paths:
        raise ConfigError("model= is empty", fix="pass a run folder, a comma list of them, or an experiment folder")
    fold_names = nnunet_model.parse_folds(folds)
    if len(paths) == 1 and not is_run_dir(paths[0]) and (paths[0] / EXPERIMENT_RUNS).is_dir():
        return _experiment_selection(paths[0], variant, fold_names)
    if len(paths) == 1 and nnunet_model.is_nnunet_model_dir(paths[0]):
        _no_variant(variant, "an nnU-Net model folder")
        nnunet_model.note_postprocessing(paths[0])
        return ModelSelection(tuple(nnunet_model.model_fold_dirs(paths[0], fold_names, checkpoint)), None)
    if fold_names is not None:
        raise ConfigError(f"folds={folds} applies to a sweep experiment or an nnU-Net model folder, but model= names "
                          "run folders", fix="drop folds=, or list the run folders of the folds you want")
    if len(paths) == 1 and is_archive(paths[0]):  # viseg export-model's one file: checked, then unpacked
        opened = open_archive(paths[0])
        post = Postprocessing.load(opened.postprocessing) if opened.postprocessing else None
        return ModelSelection(opened.run_dirs, post)
    _no_variant(variant, "run folders")
    if all(nnunet_model.is_nnunet_fold_dir(p) for p in paths):
        return ModelSelection(tuple(paths), None)
    for path in paths:
        _check_run_dir(path)
    if len(set(p.resolve() for p in paths)) != len(paths):
        raise ConfigError(f"model= lists a run folder twice: {model}", fix="list each run folder once")
    return ModelSelection(tuple(paths), _postprocessing([[p] for p in paths]))


def _no_variant(variant: str | None, what: str) -> None:
    if variant is not None:
        raise ConfigError(f"variant={variant} applies to a sweep experiment folder, but model= names {what}",
                          fix="drop variant=, or pass the experiment folder as model=")


def _check_run_dir(path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"model folder {path} does not exist", fix="pass a run folder printed by python -m "
                          "viseg.train (…/fold_<k>) or a sweep experiment folder")
    if not is_run_dir(path) and (path / EXPERIMENT_RUNS).is_dir():
        raise ConfigError(f"{path} is a sweep experiment folder, listed among other folders",
                          fix="list run folders (…/fold_<k>) only, or pass the experiment alone with variant=")
    if not is_run_dir(path):
        raise ConfigError(f"{path} is neither a viseg run folder (no config.yaml), a sweep experiment folder (no "
                          "runs/) nor an nnU-Net model folder (no plans.json, dataset.json and fold_<k>/)",
                          fix="pass …/fold_<k> of a run, the experiment folder of a sweep, or an nnU-Net "
                              "<trainer>__<plans>__<configuration> folder")


def experiment_variants(experiment: Path) -> dict[str, dict[int, Path]]:
    """variant -> fold -> run folder, for every run folder under `<experiment>/runs`, named as `summary=`
    names them (`run_layout.experiment_variants`)."""
    return layout_variants(experiment / EXPERIMENT_RUNS, runs_only=True)


def _experiment_selection(experiment: Path, variant: str | None, fold_names: list[str] | None) -> ModelSelection:
    variants = experiment_variants(experiment)
    if not variants:
        raise ConfigError(f"experiment {experiment} holds no run folders under runs/",
                          fix="wait for the sweep's first trials, or pass run folders as model=")
    if variant is None:
        if len(variants) > 1:
            raise ConfigError(f"experiment {experiment} holds {len(variants)} variants: {', '.join(sorted(variants))}",
                              fix="pick one with variant=<name>")
        variant = next(iter(variants))
    if variant not in variants:
        raise ConfigError(f"experiment {experiment} has no variant {variant!r}",
                          fix=f"use one of: {', '.join(sorted(variants))}")
    folds = variants[variant]
    if fold_names is not None:
        wanted = [int(f) for f in fold_names if f != "all"]
        absent = [k for k in wanted if k not in folds]
        if absent or len(wanted) != len(fold_names):
            raise ConfigError(f"variant {variant} of {experiment} has no fold(s) "
                              f"{', '.join(map(str, absent)) or 'all'}", fix=f"use folds among {sorted(folds)}")
        folds = {k: folds[k] for k in wanted}
    finished = [folds[k] for k in sorted(folds) if (folds[k] / FINISHED_MARKER).is_file()]
    if not finished:
        raise ConfigError(f"variant {variant} of {experiment} has no finished fold yet (folds {sorted(folds)})",
                          fix="wait for a fold to finish, or pass an unfinished run folder explicitly as model=")
    skipped = sorted(set(folds.values()) - set(finished))
    if skipped:
        log.warning("leaving out unfinished folds: %s", ", ".join(str(p) for p in skipped))
    variant_dir = finished[0].parent
    return ModelSelection(tuple(finished), _postprocessing([[variant_dir, experiment]]))


def _postprocessing(candidates: list[list[Path]]) -> Postprocessing | None:
    """The postprocessing.json of each group of candidate folders (the most specific folder first); groups
    (one per listed run folder) that disagree are an error, since one output cannot follow both."""
    found: list[Postprocessing | None] = []
    for group in candidates:
        path = next((d / POSTPROCESSING_FILE for d in group if (d / POSTPROCESSING_FILE).is_file()), None)
        found.append(Postprocessing.load(path) if path is not None else None)
    specs = {p.largest_component_labels if p else None for p in found}
    if len(specs) > 1:
        sources = ", ".join(str(p.source) if p else f"(none in {g[0]})" for p, g in zip(found, candidates))
        raise ConfigError(f"the listed run folders disagree on postprocessing: {sources}",
                          fix=f"give every run folder the same {POSTPROCESSING_FILE}, or none")
    return found[0]


# -- run folders -> networks ----------------------------------------------------------------------------


def checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    """The file behind a choice of WEIGHTS. `final` is last.ckpt of a run that finished training: the
    latest epoch of an interrupted run is not a final model, so it must be asked for as `last`."""
    if checkpoint not in WEIGHTS:
        raise ConfigError(f"checkpoint={checkpoint!r} is not a checkpoint name", fix=f"use {WEIGHTS_HELP}")
    path = run_dir / "checkpoints" / weights_file(checkpoint)
    if checkpoint == "final" and path.is_file() and not (run_dir / FINISHED_MARKER).is_file():
        raise ConfigError(f"run folder {run_dir} has not finished training (no {FINISHED_MARKER}), so it has no "
                          "final weights yet",
                          fix=f"let it finish (continue_from={run_dir}), or predict with its latest epoch: "
                              "checkpoint=last")
    if path.is_file():
        return path
    others = [w for w in WEIGHTS if w != checkpoint and (run_dir / "checkpoints" / weights_file(w)).is_file()]
    alternative = f", or predict with checkpoint={others[0]}" if others else ""
    raise ConfigError(f"run folder {run_dir} has no checkpoints/{path.name} ({checkpoint} weights)",
                      fix=f"train it (python -m viseg.train, or continue_from={run_dir}){alternative}")


def load_checkpoint(path: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"cannot load {path}: {str(exc).splitlines()[0]}",
                          fix="the file is truncated, corrupt or not a viseg checkpoint: use the other "
                              "checkpoint (checkpoint=best|last) or retrain") from None
    if not isinstance(checkpoint, dict) or "viseg" not in checkpoint or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a viseg checkpoint (no plan and config inside)",
                          fix="pass run folders written by python -m viseg.train")
    return checkpoint


NETWORK_PREFIX = "network."  # the LightningModule's attribute holding the network


def network_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The network's tensors in a viseg checkpoint, named as the network names them."""
    return {k[len(NETWORK_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(NETWORK_PREFIX)}


def run_config(checkpoint: dict[str, Any], path: Path) -> BaseConfig:
    """The run's fully resolved config, as saved in its checkpoint."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        saved = OmegaConf.create(checkpoint["viseg"]["config_yaml"])
        return to_typed(OmegaConf.merge(OmegaConf.structured(BaseConfig), saved))
    except (ConfigError, OmegaConfBaseException) as exc:
        message = exc.message if isinstance(exc, ConfigError) else str(exc).splitlines()[0]
        raise ConfigError(f"the config inside {path} does not validate: {message}",
                          fix="use a checkpoint written by this version of viseg") from None


def training_mirror_axes(cfg: BaseConfig) -> tuple[int, ...]:
    """The patch axes training mirrored. Mirroring at test time along an axis the network never saw
    mirrored averages in predictions it was not trained to make (nnU-Net's inference_allowed_mirroring_axes)."""
    augmentation = cfg.augmentation
    if not augmentation.enabled or augmentation.p_mirror == 0:
        return ()
    dim = cfg.model.model_args.conv_dim
    return tuple(range(dim)) if augmentation.mirror_axes is None else tuple(augmentation.mirror_axes)


def _network(plans: Plans, configuration: str, state: dict[str, Any], path: Path) -> nn.Module:

    from viseg.planning.network import build_model
    # deep supervision changes only what forward returns, not the weights; inference needs the top output
    network = build_model(plans, configuration, deep_supervision=False)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"the weights in {path} do not fit the plan saved with them: {str(exc).splitlines()[0]}",
                          fix="the checkpoint is damaged or from another version: retrain the run") from None
    return network.eval()


@dataclass
class _LoadedRun:
    run_dir: Path
    network: nn.Module
    plans: Plans
    configuration: str
    mirror_axes: tuple[int, ...]
    pathfinder: str
    file_ending: str
    weights_file: str


def _load_run(run_dir: Path, checkpoint: str) -> _LoadedRun:
    if nnunet_model.is_nnunet_fold_dir(run_dir):
        return _load_nnunet_fold(run_dir, checkpoint)

    from viseg.preprocessing.prepare import configuration_name
    path = checkpoint_path(run_dir, checkpoint)
    data = load_checkpoint(path)
    cfg = run_config(data, path)
    plans = plans_from_dict(data["viseg"]["plans"], source=str(path))
    configuration = configuration_name(cfg)
    state = network_state(data)
    return _LoadedRun(run_dir, _network(plans, configuration, state, path), plans, configuration,
                      training_mirror_axes(cfg), cfg.dataset.pathfinder, _file_ending(run_dir),
                      str(path.relative_to(run_dir)))


def _load_nnunet_fold(fold_dir: Path, checkpoint: str) -> _LoadedRun:
    """A fold of an nnU-Net model: images named as in nnU-Net's raw layout (one file per channel)."""
    fold = nnunet_model.read_fold(fold_dir, checkpoint)
    log.info("%s: nnU-Net %s model (trainer %s), %s", fold_dir, fold.nnunet_configuration, fold.trainer,
             fold.checkpoint.name)
    network = _network(fold.plans, fold.configuration, fold.weights, fold.checkpoint)
    return _LoadedRun(fold_dir, network, fold.plans, fold.configuration, fold.mirror_axes, "nnunet",
                      fold.file_ending, fold.checkpoint.name)


def plan_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """'key.path: value vs value' for every leaf where two plan dicts differ."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            out += plan_differences(left, right, f"{prefix}{key}.")
        elif left != right:
            out.append(f"{prefix}{key}: {left} vs {right}")
    return out


# What the groups of one ensemble must share: the input channels and what each output means (the label values,
# their names, regions and the order regions write back). Everything else may differ between configurations.
SHARED_PLAN_FIELDS = ("channel_names", "labels", "foreground_labels", "regions", "regions_class_order")


def _plan_key(run: _LoadedRun) -> dict[str, Any]:
    return {"configuration": run.configuration, **run.plans.to_dict()}


def _group_runs(runs: list[_LoadedRun]) -> list[list[_LoadedRun]]:
    """Runs by (configuration, plan), in the order their groups first appear. Runs of one group see the same
    preprocessed input, so their networks are averaged window by window on one grid."""
    groups: list[tuple[dict[str, Any], list[_LoadedRun]]] = []
    for run in runs:
        key = _plan_key(run)
        group = next((members for plan, members in groups if plan == key), None)
        if group is None:
            groups.append((key, [run]))
        else:
            group.append(run)
    return [members for _, members in groups]


def _check_same_outputs(groups: list[list[_LoadedRun]]) -> None:
    """Groups are averaged class by class, so each must take the same channels and give output k the same
    meaning; ConfigError naming the first two run folders that disagree, and on what, else."""
    first = groups[0][0]
    shared = {name: first.plans.to_dict()[name] for name in SHARED_PLAN_FIELDS}
    for group in groups[1:]:
        run = group[0]
        differences = plan_differences(shared, {name: run.plans.to_dict()[name] for name in SHARED_PLAN_FIELDS})
        if differences:
            shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
            raise ConfigError(f"{first.run_dir} and {run.run_dir} take different input channels or predict "
                              f"different labels ({shown}); an ensemble averages probabilities of the same "
                              "classes from the same images",
                              fix="ensemble runs trained on the same dataset with the same label settings "
                                  "(foreground_labels, regions); runs of other configurations or plans are fine")


def _file_ending(run_dir: Path) -> str:
    path = run_dir / "dataset.json"
    try:
        ending = read_json(path).get("file_ending", ".nii.gz") if path.is_file() else ".nii.gz"
    except (OSError, ValueError):
        ending = ".nii.gz"
    return ending if isinstance(ending, str) else ".nii.gz"


def load_ensemble(run_dirs: list[Path] | tuple[Path, ...], checkpoint: str = "final",
                  device: str | torch.device = "auto") -> Ensemble:
    """Load every run's network, grouped by (configuration, plan). One group is averaged network by network;
    several groups must agree on channels and labels (ConfigError naming two folders else) and are averaged
    group by group in the image's geometry (`Ensemble.groups`)."""
    import torch

    from viseg.inference.device import resolve_device

    if not run_dirs:
        raise ConfigError("no run folders to load", fix="pass at least one run folder")
    target = torch.device(resolve_device(device) if isinstance(device, str) else device)
    runs = [_load_run(Path(d), checkpoint) for d in run_dirs]
    groups = _group_runs(runs)
    if len(groups) == 1:
        return _one_group(groups[0], target)
    _check_same_outputs(groups)
    members = [_one_group(group, target) for group in groups]
    log.info("ensemble of %d groups, each weighing the same: %s", len(members),
             "; ".join(f"{m.configuration} ({len(m.run_dirs)} run(s): {', '.join(str(d) for d in m.run_dirs)})"
                       for m in members))
    first = members[0]
    return Ensemble(run_dirs=[d for m in members for d in m.run_dirs],
                    networks=[n for m in members for n in m.networks], plans=first.plans,
                    configuration=first.configuration, mirror_axes=first.mirror_axes, device=target,
                    pathfinder=first.pathfinder, file_ending=first.file_ending, weights_file=first.weights_file,
                    groups=members)


def _one_group(runs: list[_LoadedRun], device: torch.device) -> Ensemble:
    """Runs of one configuration and plan as one ensemble (with its lowres ensemble, for a cascade)."""
    # runs of one variant mirror alike; should they not, only the axes all of them saw mirrored are safe
    axes = set.intersection(*(set(r.mirror_axes) for r in runs))
    return Ensemble(run_dirs=[r.run_dir for r in runs], networks=[r.network.to(device) for r in runs],
                    plans=runs[0].plans, configuration=runs[0].configuration, mirror_axes=tuple(sorted(axes)),
                    device=device, pathfinder=runs[0].pathfinder, file_ending=runs[0].file_ending,
                    weights_file=runs[0].weights_file, previous=_previous_stage(runs, device))


def _previous_stage(runs: list[_LoadedRun], device: torch.device) -> Ensemble | None:
    """A cascade's lowres ensemble: the previous_stage/ copy in each of its run folders (final weights, as
    nnU-Net's cascade predicts with its lowres model's checkpoint_final)."""
    if runs[0].plans.configuration(runs[0].configuration).previous_stage is None:
        return None
    folders = [r.run_dir / PREVIOUS_STAGE_DIR for r in runs]
    missing = [str(f) for f in folders if not (f / FINISHED_MARKER).is_file()]
    if missing:
        raise ConfigError(f"cascade run(s) without their previous stage: {', '.join(missing)} missing",
                          fix="a cascade run keeps its lowres run in previous_stage/; restore it (or retrain the "
                              "cascade with previous_stage=<lowres run>)")
    return load_ensemble(folders, "final", device)
