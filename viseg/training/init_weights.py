"""`init_from=`: a new run that starts from another run's weights (fine-tuning), not a continued one.

The weights load by name and shape into the network this run's plan builds. Two kinds of tensors may differ
and are then left as the new network initialised them: the segmentation heads (another number of classes) and
the first convolution (another number of input channels). Anything else that differs means another topology,
which no fine-tuning can bridge: the error names the first stage that differs and the plan values that would
make it match. Epoch, optimizer, schedule and EMA start afresh (continue_from= is the way to go on with a run).

Sources: a viseg run folder (its final weights, or its latest with an explicit `.../checkpoints/last.ckpt`),
a viseg checkpoint file, a model.zip of `viseg export-model` (its first run), or a trained nnU-Net v2 model:
its folder when it holds one finished fold, a `fold_<k>` folder, or a `checkpoint_*.pth` in one. All are loaded
with `weights_only=True` like every checkpoint viseg reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from viseg.config import BaseConfig
from viseg.errors import ConfigError
from viseg.inference import nnunet_model
from viseg.inference.ensemble import checkpoint_path, load_checkpoint, network_state, run_config
from viseg.io.layout import CHECKPOINTS_DIR
from viseg.io.model_archive import is_archive, open_archive

HEAD = re.compile(r"(^|\.)seg_layers\.\d+\.")  # dynamic-network-architectures' segmentation heads
STAGE = re.compile(r"^(encoder|decoder)\.(stages|transpconvs)\.(\d+)")
INIT_REPORT = "init_from.json"  # in the run folder: what init_from= loaded and what it left to the new run


@dataclass
class InitReport:
    """What `init_from` gave the new network, by parameter name (aliases of one tensor listed once)."""

    source: Path
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # heads or first convolution of another shape

    def to_dict(self) -> dict[str, Any]:
        return {"source": str(self.source), "loaded": self.loaded, "reinitialised": self.reinitialised}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InitReport:
        return cls(Path(data["source"]), list(data["loaded"]), list(data["reinitialised"]))

    def lines(self) -> list[str]:
        total = len(self.loaded) + len(self.reinitialised)
        lines = [f"initialised from {self.source}: {len(self.loaded)} of {total} parameter tensors loaded"]
        if self.reinitialised:
            lines.append("re-initialised (another shape in the source): " + ", ".join(self.reinitialised))
        return lines


def source_checkpoint(init_from: str) -> Path:
    """The checkpoint file `init_from` names: a run folder's final weights, or the file itself."""
    path = Path(init_from).expanduser()
    if is_archive(path):  # a model.zip: its first run's weights
        opened = open_archive(path)
        return checkpoint_path(opened.run_dirs[0], opened.checkpoint)
    if nnunet_model.is_nnunet_model_dir(path):
        path = nnunet_model.single_fold(path, init_from)
    if nnunet_model.is_nnunet_fold_dir(path):
        final = path / nnunet_model.CHECKPOINT_FILES["final"]
        if not final.is_file():
            raise ConfigError(f"init_from={init_from}: {path} has no {final.name} (the fold has not finished)",
                              fix=f"let it finish, or name another checkpoint file: init_from={path}/<file>.pth")
        return final
    if path.is_dir():
        if not (path / CHECKPOINTS_DIR).is_dir():
            raise ConfigError(f"init_from={init_from} is not a viseg run folder (no {CHECKPOINTS_DIR}/)",
                              fix="pass a run folder (results/<dataset>/<plan>/<name>/fold_<k>) or a .ckpt file")
        return checkpoint_path(path, "final")
    if not path.is_file():
        raise ConfigError(f"init_from={init_from} does not exist", fix="pass a run folder or a .ckpt file")
    return path


def _source_state(path: Path) -> tuple[dict[str, Any], str]:
    """The source's network weights, and how to plan this dataset so that they fit."""
    if nnunet_model.is_nnunet_checkpoint(path):
        fold = nnunet_model.read_fold(path.parent, checkpoint_file=path)
        return fold.weights, _match_fix(None, path.parent.parent)
    checkpoint = load_checkpoint(path)
    state = network_state(checkpoint)
    run_dir = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else None
    return state, _match_fix(run_config(checkpoint, path), run_dir)


def _stage(key: str) -> str:
    found = STAGE.match(key)
    if found is None:
        return key.rsplit(".", 2)[0]
    part, kind, index = found.groups()
    return f"{part} stage {index}" + (" (upsampling)" if kind == "transpconvs" else "")


def _match_fix(source_cfg: BaseConfig | None, source_dir: Path | None) -> str:
    """Plan this dataset like the source (nnU-Net's "transfer the plans" step): with plan.from= when the source
    is a folder, or with the source's own plan values."""
    ways = [f"plan.from={source_dir}"] if source_dir is not None else []
    if source_cfg is not None:
        values = [f"patch_size=[{','.join(map(str, source_cfg.patch_size or []))}]",
                  f"spacing=[{','.join(f'{v:g}' for v in source_cfg.spacing or [])}]",
                  f"plan.base_num_features={source_cfg.plan.base_num_features}"
                  if source_cfg.plan.base_num_features is not None else ""]
        ways.append(" ".join(v for v in values if v))
    if not ways:
        return "plan this dataset with the source's patch size, spacing and network width"
    return ("plan this dataset like the source (nnU-Net's \"transfer the plans\" step): " + ", or ".join(ways))


def initialise_from(network: Any, path: Path, init_from: str) -> InitReport:
    """Load what fits of the checkpoint `path` (found by `source_checkpoint(init_from)`) into `network`, in
    place; refuse another topology."""
    source, fix = _source_state(path)
    target = network.state_dict()
    first_conv = next(value for value in target.values() if value.ndim >= 3)
    replaceable = {key for key, value in target.items()
                   if HEAD.search(key) or value.data_ptr() == first_conv.data_ptr()}
    merged, differing = dict(target), []
    for key, value in target.items():
        theirs = source.get(key)
        if theirs is not None and tuple(theirs.shape) == tuple(value.shape):
            merged[key] = theirs
        elif theirs is None or key not in replaceable:
            differing.append(key)
    extra = [key for key in source if key not in target]
    if differing or extra:
        key = (differing or extra)[0]
        theirs, ours = source.get(key), target.get(key)
        shapes = (f"{list(theirs.shape) if theirs is not None else 'absent'} in the source, "
                  f"{list(ours.shape) if ours is not None else 'absent'} here")
        raise ConfigError(f"init_from={init_from}: this plan's network differs from the source's at "
                          f"{_stage(key)} ({key}: {shapes}), so its weights cannot start this run",
                          fix=fix)
    network.load_state_dict(merged)
    report = InitReport(source=path)
    for name, parameter in network.named_parameters():
        theirs = source.get(name)
        fits = theirs is not None and tuple(theirs.shape) == tuple(parameter.shape)
        (report.loaded if fits else report.reinitialised).append(name)
    return report


def encoder_parameters(network: Any, report: InitReport | None = None) -> list[Any]:
    """The encoder's parameters that came from the source (a re-initialised first convolution must learn)."""
    fresh = set(report.reinitialised) if report is not None else set()
    return [p for name, p in network.named_parameters() if name.startswith("encoder.") and name not in fresh]
