"""Names in a run folder, and of the run folders in an experiment, that several modules read. Import-free on
purpose (standard library only): `--help`, the summary and the predict loader use them without pulling in
Lightning."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

FINISHED_MARKER = "finished.json"  # written by train() last, after the validation summary
RUN_CONFIG = "config.yaml"  # written once the run's data is ready: its presence makes a folder a run
EXPERIMENT_RUNS = "runs"  # a sweep experiment's run folders: runs/<dataset>/<plan>/<variant>/fold_<k>
CODE_SNAPSHOTS = "code"  # <experiment>/code/<content hash>/viseg: the package a sweep's trials run (sweep/code_pin)
CODE_VERSION = "code.json"  # the code a run started with (viseg.provenance): version, commit, dirty flag
TRAINING_LOG = "training_log.txt"  # one plain line per epoch, appended (nnU-Net's habit); a resume adds to it
FOLD_DIR = re.compile(r"fold_(\d+)")
# nnU-Net's cascade. A 3d_lowres run keeps its predictions of a fold's cases, resampled to the next stage's
# preprocessed grid, in predicted_next_stage/<next stage>/; a cascade run keeps a copy of the lowres run it was
# trained on in previous_stage/, so that the run folder alone predicts through both stages.
NEXT_STAGE_DIR = "predicted_next_stage"
PREVIOUS_STAGE_DIR = "previous_stage"

# checkpoints/ of a run folder. last.ckpt is replaced after every epoch by two renames (last -> previous, new ->
# last), so a kill between them leaves previous.ckpt alone: whatever resumes must look for both.
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
PREVIOUS_CHECKPOINT = "previous.ckpt"
BEST_CHECKPOINT = "best.ckpt"  # best moving-average pseudo-Dice so far
RESUMABLE_CHECKPOINTS = (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT)  # newest first

# Which weights of a run predict, best= and the ensembles use. nnU-Net predicts with checkpoint_final.pth;
# "best" (the best moving-average pseudo-Dice) rests on a few hundred validation patches, so it is an option.
WEIGHTS = ("final", "best", "last")
WEIGHTS_HELP = ("final (the end of training, nnU-Net's checkpoint_final), best (best moving-average pseudo-Dice) "
                "or last (the latest epoch, also of an unfinished run)")




@dataclass(frozen=True)
class CachedCaseFiles:
    """The files of one preprocessed case in `.viseg_cache/preprocessed/<configuration>-<hash>/`: three arrays,
    then the marker (sizes, digests, properties), written last so that its presence means a complete case."""

    data: str  # float32 (C, Z, Y, X)
    seg: str  # int16 (1, Z, Y, X): original label values, -1 outside the nonzero mask
    foreground: str  # npz of foreground locations, one key per label value (`foreground_key`)
    marker: str

    @property
    def arrays(self) -> tuple[str, str, str]:
        return self.data, self.seg, self.foreground


def cached_case_files(case_id: str) -> CachedCaseFiles:
    return CachedCaseFiles(f"{case_id}_data.npy", f"{case_id}_seg.npy", f"{case_id}_fg.npz", f"{case_id}.json")


def foreground_key(label_value: int | tuple[int, ...]) -> str:
    """`class_1`, or for a region (several label values) `class_(1, 2, 3)`."""
    if isinstance(label_value, tuple):
        return f"class_{tuple(int(v) for v in label_value)}"
    return f"class_{int(label_value)}"


def label_of_foreground_key(key: str) -> int | tuple[int, ...]:
    value = key.removeprefix("class_")
    if value.startswith("("):
        return tuple(int(v) for v in value.strip("(),").split(",") if v.strip())
    return int(value)


def weights_file(weights: str) -> str:
    """The checkpoint file (under checkpoints/) that holds a choice of WEIGHTS."""
    return "best.ckpt" if weights == "best" else "last.ckpt"


def describe_weights(weights: str, file: str | None = None) -> str:
    """For the log: which weights a prediction uses, and which file they come from (`file`: another
    layout's, e.g. an nnU-Net model's checkpoint_final.pth)."""
    source = {"final": "the end of training", "best": "best moving-average pseudo-Dice",
              "last": "latest epoch, finished or not"}[weights]
    return f"{weights} weights ({source}: {file or f'checkpoints/{weights_file(weights)}'})"


def _variant_keys(variant_dirs: list[Path]) -> dict[Path, str]:
    """Each variant folder by its name; '<plan>/<name>' (or the whole sub-path) only where names clash, so
    that two plans with the same variant name are never taken for one."""
    by_name: dict[str, list[Path]] = defaultdict(list)
    for rel in variant_dirs:
        by_name[rel.name].append(rel)
    keys = {}
    for name, rels in by_name.items():
        if len(rels) == 1:
            keys[rels[0]] = name
            continue
        short = {rel: "/".join(rel.parts[-2:]) for rel in rels}
        unique = len(set(short.values())) == len(rels)
        keys.update({rel: short[rel] if unique else rel.as_posix() for rel in rels})
    return keys


def experiment_variants(runs: Path, runs_only: bool = False) -> dict[str, dict[int, Path]]:
    """The variants of an experiment's `runs/` folder: variant name -> fold -> fold folder, at any depth. The
    one place variant names are made, so the name `summary=` prints is the one `variant=` and `best=` take.
    Names are chosen over every fold folder; `runs_only` then keeps those that hold a run (config.yaml)."""
    found: dict[Path, dict[int, Path]] = defaultdict(dict)
    if runs.is_dir():
        for path in sorted(runs.rglob("fold_*")):
            match = FOLD_DIR.fullmatch(path.name)
            if match and path.is_dir() and path.parent != runs:
                found[path.parent.relative_to(runs)][int(match.group(1))] = path
    keys = _variant_keys(list(found))
    variants = {keys[rel]: folds for rel, folds in found.items()}
    if runs_only:
        variants = {name: kept for name, folds in variants.items()
                    if (kept := {f: p for f, p in folds.items() if is_run_dir(p)})}
    return variants


def is_run_dir(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file()

