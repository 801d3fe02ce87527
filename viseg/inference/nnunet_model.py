"""Trained nnU-Net v2 model folders, read as data: `nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>`.

Such a folder holds `plans.json`, `dataset.json` and `fold_<k>/checkpoint_final.pth` (also `checkpoint_best.pth`
and `checkpoint_latest.pth`). viseg predicts with it and fine-tunes from it without nnU-Net installed, and
without running anything the folder ships:

* the plan is translated by `viseg.planning.nnunet_plans`, which refuses what viseg would not reproduce;
* the network is rebuilt through viseg's own registry, so the only thing taken from the checkpoint is tensors;
* the checkpoint is loaded with `torch.load(weights_only=True)`, allowlisting exactly the numpy scalar types
  that nnU-Net's training log pickles (its per-epoch Dice and losses are numpy floats);
* the trainer must be `nnUNetTrainer` or one of nnU-Net's own training-length variants, which change the
  number of epochs and, for the `_NoMirroring` ones, the mirroring (read from the checkpoint's
  `inference_allowed_mirroring_axes`); any other trainer may build or train its network differently.
* `postprocessing.pkl` (a pickle) is never read.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viseg.errors import ConfigError
from viseg.io.jsonio import read_json
from viseg.planning.nnunet_plans import (
    DATASET_FILE,
    FOLD_DIR,
    PLANS_FILE,
    fold_dirs,
    is_nnunet_model_dir,
    plans_from_nnunet,
)
from viseg.planning.plans import Plans

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# viseg's names for the weights (io.layout.WEIGHTS) -> nnU-Net's checkpoint files
CHECKPOINT_FILES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth", "last": "checkpoint_latest.pth"}
# nnU-Net 2.8.1's nnUNetTrainer and its variants in training/nnUNetTrainer/variants/training_length/: each only
# sets num_epochs (and, for _NoMirroring, turns mirroring off, which the checkpoint records).
_EPOCH_VARIANTS = ("1epoch", "5epochs", "10epochs", "20epochs", "50epochs", "100epochs", "250epochs", "500epochs",
                   "750epochs", "2000epochs", "4000epochs", "8000epochs", "250epochs_NoMirroring",
                   "2000epochs_NoMirroring", "4000epochs_NoMirroring", "8000epochs_NoMirroring")
TRAINERS = frozenset({"nnUNetTrainer", *(f"nnUNetTrainer_{v}" for v in _EPOCH_VARIANTS)})


@dataclass(frozen=True)
class NnunetFold:
    """One fold of an nnU-Net model: its plan as viseg's, its weights, and how it may be mirrored."""

    fold_dir: Path
    checkpoint: Path
    plans: Plans
    configuration: str  # viseg's name (2d or 3d_fullres)
    nnunet_configuration: str  # as nnU-Net names it (the folder's and the checkpoint's)
    trainer: str
    weights: dict[str, torch.Tensor]
    mirror_axes: tuple[int, ...]
    file_ending: str


def is_nnunet_fold_dir(path: Path) -> bool:
    return bool(FOLD_DIR.match(path.name)) and is_nnunet_model_dir(path.parent)


def is_nnunet_checkpoint(path: Path) -> bool:
    return path.suffix == ".pth" and is_nnunet_fold_dir(path.parent)


def parse_folds(folds: str | None) -> list[str] | None:
    """`folds=0,1,2` (or `all`, nnU-Net's fold trained on every case) -> fold names; None keeps every fold."""
    if folds is None or str(folds).strip() == "":
        return None
    names = [f.strip() for f in str(folds).strip("[]").split(",") if f.strip()]
    bad = [f for f in names if not (f == "all" or f.isdigit())]
    if bad or not names:
        raise ConfigError(f"folds={folds} must list fold numbers (or all)", fix="use e.g. folds=0,1,2,3,4")
    return [str(int(f)) if f.isdigit() else f for f in names]


def model_fold_dirs(model_dir: Path, folds: list[str] | None, checkpoint: str) -> list[Path]:
    """The fold folders of `model_dir` that predict: those named by `folds`, or (as nnUNetv2_predict does
    without -f) every fold_<k> that holds the checkpoint, fold_all left out."""
    name = CHECKPOINT_FILES[checkpoint]
    available = fold_dirs(model_dir)
    if folds is None:
        chosen = [d for d in available if d.name != "fold_all" and (d / name).is_file()]
        if not chosen:
            raise ConfigError(f"nnU-Net model folder {model_dir} has no fold_<k>/{name}",
                              fix="train a fold to the end, name folds=all, or pick checkpoint=best|last")
        return chosen
    chosen = []
    for fold in folds:
        fold_dir = model_dir / f"fold_{fold}"
        if not (fold_dir / name).is_file():
            present = [d.name for d in available if (d / name).is_file()]
            raise ConfigError(f"nnU-Net model folder {model_dir} has no fold_{fold}/{name}",
                              fix=f"use folds among {present or 'none'}, or another checkpoint=")
        chosen.append(fold_dir)
    return chosen


def _numpy_scalar_globals() -> list[Any]:
    """What nnU-Net's checkpoint pickles besides tensors: numpy scalars (its log) and their dtypes. Named
    both as numpy 2 and as numpy 1 modules pickle them, since a model may have been trained under either."""
    import numpy as np
    from numpy._core.multiarray import scalar

    dtypes = [getattr(np.dtypes, name) for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType",
                                                    "Int32DType", "Int16DType", "Int8DType", "UInt8DType",
                                                    "BoolDType")]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def load_nnunet_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    allowed = _numpy_scalar_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        names = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in allowed}
        found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in names]
        raise ConfigError(f"{path} holds {', '.join(found) or 'objects'} besides tensors and numpy scalars: "
                          "loading it would run code, so viseg does not unpickle it",
                          fix="use a checkpoint written by nnU-Net's own trainers") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise ConfigError(f"cannot load {path}: {str(exc).splitlines()[0]}",
                          fix="the file is truncated or corrupt: copy it again, or use another checkpoint=") from None
    missing = [k for k in ("network_weights", "trainer_name", "init_args") if not isinstance(checkpoint, dict)
               or k not in checkpoint]
    if missing:
        raise ConfigError(f"{path} is not an nnU-Net v2 checkpoint (no {', '.join(missing)})",
                          fix="use fold_<k>/checkpoint_final.pth of an nnU-Net v2 model folder")
    return checkpoint


def read_fold(fold_dir: Path, checkpoint: str = "final", checkpoint_file: Path | None = None) -> NnunetFold:
    """One fold folder of an nnU-Net model, its plan translated and its trainer checked."""
    model_dir = fold_dir.parent
    path = checkpoint_file or fold_dir / CHECKPOINT_FILES[checkpoint]
    if not path.is_file():
        raise ConfigError(f"{fold_dir} has no {path.name}", fix="train the fold to the end, or use another checkpoint=")
    data = load_nnunet_checkpoint(path)
    trainer = str(data["trainer_name"])
    if trainer not in TRAINERS:
        raise ConfigError(f"{path} was trained by {trainer}, a trainer viseg does not reproduce (it may build, "
                          "augment or train its network differently from nnU-Net's nnUNetTrainer)",
                          fix="use a model trained by nnUNetTrainer or one of its training-length variants "
                              "(nnUNetTrainer_<N>epochs)")
    init_args = data["init_args"] if isinstance(data["init_args"], dict) else {}
    configuration = init_args.get("configuration")
    if not isinstance(configuration, str):
        raise ConfigError(f"{path} does not name its configuration (init_args.configuration)",
                          fix="use a checkpoint written by nnU-Net v2's trainer")
    dataset_json = read_json(model_dir / DATASET_FILE)
    plans = plans_from_nnunet(read_json(model_dir / PLANS_FILE), dataset_json, configuration, str(model_dir))
    axes = tuple(int(a) for a in data.get("inference_allowed_mirroring_axes") or ())
    dim = len(next(iter(plans.configurations.values())).patch_size)
    if any(not 0 <= a < dim for a in axes):
        raise ConfigError(f"{path}: inference_allowed_mirroring_axes {list(axes)} are not axes of a {dim}D patch",
                          fix="use the checkpoint nnU-Net wrote for this model")
    return NnunetFold(
        fold_dir=fold_dir, checkpoint=path, plans=plans, configuration=next(iter(plans.configurations)),
        nnunet_configuration=configuration, trainer=trainer, weights=data["network_weights"],
        mirror_axes=axes,
        file_ending=str(dataset_json.get("file_ending", ".nii.gz")))


def single_fold(model_dir: Path, init_from: str) -> Path:
    """The one fold of a model folder that `init_from=` may mean; a folder of several must be narrowed."""
    folds = [d for d in fold_dirs(model_dir) if (d / CHECKPOINT_FILES["final"]).is_file()]
    if len(folds) != 1:
        raise ConfigError(f"init_from={init_from} is an nnU-Net model folder with {len(folds)} finished folds "
                          f"({', '.join(d.name for d in folds) or 'none'})",
                          fix=f"name one: init_from={model_dir / (folds[0].name if folds else 'fold_0')}")
    return folds[0]


def note_postprocessing(model_dir: Path) -> None:
    if (model_dir / "postprocessing.pkl").is_file() or (model_dir.parent / "postprocessing.pkl").is_file():
        log.info("nnU-Net's postprocessing.pkl is not read (a pickle); to keep only the largest component of some "
                 "labels, pass postprocessing=<file.json> holding {\"largest_component_labels\": [...]}")
