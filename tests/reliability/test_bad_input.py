"""Corrupt and hostile datasets and configs, through the real command lines.

Two tables: datasets (each a copy of a tiny valid nnU-Net dataset, broken in one way) and configs (bad
overrides on a valid dataset). A refused input must exit nonzero with ONE message that names the file or
key and says how to fix it, without a traceback, and must leave no trace: no cache, results or demo folders,
no changed dataset file. Unusual but valid inputs (unicode paths, symlinks) must work.

Each row is a subprocess (~1.5 s of CPU, mostly imports and Hydra's composition). The rows the session
selected are launched together in a small pool, so the file takes under a minute on an idle 2-core machine.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.tiny import (
    SHAPE,
    TinyDataset,
    copy_dataset,
    keep_one_channel,
    make_tiny_dataset,
    read_zyx,
    run_viseg,
    valid_label,
    write_nifti,
)

PARALLEL = 4  # subprocesses at once: mostly waiting on imports and disk, so a little above the core count
Breaker = Callable[[TinyDataset, Path], list[str]]  # damages a copy; returns what the message must name


@dataclass(frozen=True)
class DatasetCase:
    name: str
    breaker: Breaker
    outcome: str = "error"  # "error": refused; "warning": passes, with a warning; "ok": must simply work
    command: str = ""  # default: plan for refused datasets (proves nothing is written), verify otherwise
    overrides: tuple[str, ...] = ()
    quoted: bool = False  # pass the path in Hydra's quotes, as a path with brackets or parentheses needs

    @property
    def module(self) -> str:
        return self.command or ("plan" if self.outcome == "error" else "verify")


@dataclass(frozen=True)
class ConfigCase:
    name: str
    module: str
    overrides: tuple[str, ...]
    words: tuple[str, ...]  # the first names the key: the fix must follow it
    with_dataset: bool = True  # without: dataset.basepath stays empty (the demo dataset must not be made)


@dataclass
class Run:
    result: subprocess.CompletedProcess[str]
    work: Path  # the working directory; paths.cache and paths.results point inside it
    words: list[str]
    dataset_before: list[Path] = field(default_factory=list)
    dataset: TinyDataset | None = None

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr


# -- dataset breakers ---------------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncated_image(ds: TinyDataset, outside: Path) -> list[str]:
    _truncate(ds.image())
    return [str(ds.image()), "unreadable", "truncated"]


def garbage_bytes(ds: TinyDataset, outside: Path) -> list[str]:
    ds.image().write_bytes(np.random.default_rng(1).bytes(4096))
    return [str(ds.image()), "unreadable"]


def garbage_inside_gzip(ds: TinyDataset, outside: Path) -> list[str]:
    ds.image().write_bytes(gzip.compress(b"not a NIfTI header " * 40))  # a valid gzip of junk
    return [str(ds.image()), "unreadable"]


def empty_file(ds: TinyDataset, outside: Path) -> list[str]:
    ds.label().write_bytes(b"")
    return [str(ds.label()), "unreadable"]


def image_2d(ds: TinyDataset, outside: Path) -> list[str]:
    write_nifti(np.zeros(SHAPE[1:], np.float32), ds.image())
    return [str(ds.image()), "dimensionality", "2D"]


def image_4d(ds: TinyDataset, outside: Path) -> list[str]:
    write_nifti(np.zeros((2, *SHAPE), np.float32), ds.image())
    return [str(ds.image()), "dimensionality", "4D"]


def _poke(path: Path, value: float) -> None:
    data = read_zyx(path)
    data[1, 2, 3] = value
    write_nifti(data, path)


def image_nan(ds: TinyDataset, outside: Path) -> list[str]:
    _poke(ds.image(), np.nan)
    return [str(ds.image()), "nan", "1 NaN voxel"]


def image_inf(ds: TinyDataset, outside: Path) -> list[str]:
    _poke(ds.image("case_002", 0), -np.inf)
    return [str(ds.image("case_002", 0)), "inf", "1 infinite voxel"]


def label_shape_mismatch(ds: TinyDataset, outside: Path) -> list[str]:
    write_nifti(np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] + 1), np.uint8), ds.label())
    return [str(ds.label()), "shape-mismatch", "(6, 12, 13)"]


def spacing_mismatch(ds: TinyDataset, outside: Path) -> list[str]:
    write_nifti(read_zyx(ds.image()), ds.image(), spacing_zyx=(3.0, 1.0, 1.0))
    return [str(ds.image()), "spacing-mismatch", "3.0"]


def affine_direction_mismatch(ds: TinyDataset, outside: Path) -> list[str]:
    flipped = np.diag([-1.0, 1.0, 2.0, 1.0])  # same spacing, x axis reversed
    write_nifti(valid_label(), ds.label(), affine=flipped)
    return [str(ds.label()), "affine-mismatch", "direction"]


def label_outside_set(ds: TinyDataset, outside: Path) -> list[str]:
    label = valid_label()
    label[0, 0, :2] = 7
    write_nifti(label, ds.label())
    return [str(ds.label()), "label-outside-set", "[7]"]


def empty_images_folder(ds: TinyDataset, outside: Path) -> list[str]:
    for path in (ds.root / "imagesTr").iterdir():
        path.unlink()
    return [str(ds.root / "imagesTr"), "empty-dataset"]


def missing_labels_folder(ds: TinyDataset, outside: Path) -> list[str]:
    shutil.rmtree(ds.root / "labelsTr")
    return [str(ds.root / "labelsTr"), "missing-folder", "missing-label"]


def missing_channel_file(ds: TinyDataset, outside: Path) -> list[str]:
    ds.image().unlink()
    return [str(ds.image()), "missing-channel", "channel 0001"]


def _json_breaker(message: str, drop: tuple[str, ...] = (), **changes: object) -> Breaker:
    def breaker(ds: TinyDataset, outside: Path) -> list[str]:
        ds.edit_json(drop=drop, **changes)
        return [str(ds.dataset_json), "dataset-json", message]

    return breaker


def num_training_mismatch(ds: TinyDataset, outside: Path) -> list[str]:
    ds.edit_json(numTraining=5)
    return [str(ds.dataset_json), "num-training", "numTraining=5", "3 cases"]


def dangling_image_symlink(ds: TinyDataset, outside: Path) -> list[str]:
    ds.image().unlink()
    ds.image().symlink_to(outside / "moved_away.nii.gz")
    return [str(ds.image()), "broken-file", "broken symbolic link", "moved_away.nii.gz"]


def dangling_label_symlink(ds: TinyDataset, outside: Path) -> list[str]:
    ds.label().unlink()
    ds.label().symlink_to(outside / "moved_away.nii.gz")
    return [str(ds.label()), "broken-file", "broken symbolic link"]


def symlink_loop(ds: TinyDataset, outside: Path) -> list[str]:
    ds.image().unlink()
    ds.image().symlink_to(ds.image().name)  # points at itself
    return [str(ds.image()), "broken-file"]


def symlink_to_foreign_file(ds: TinyDataset, outside: Path) -> list[str]:
    """A link out of the dataset to something that is not an image (here a text file, e.g. /etc/passwd)."""
    secret = outside / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    ds.image().unlink()
    ds.image().symlink_to(secret)
    return [str(ds.image()), "unreadable"]


def _move(ds: TinyDataset, target: Path) -> None:
    target.parent.mkdir(parents=True)
    shutil.move(ds.root, target)
    ds.root = ds.basepath = target


def unicode_and_spaces(ds: TinyDataset, outside: Path) -> list[str]:
    _move(ds, outside / "dätä sét ü 日本" / "Dataset 001 ñ")
    return ["PASSED"]


def symlinked_dataset_folder(ds: TinyDataset, outside: Path) -> list[str]:
    link = outside / "linked dataset"
    link.symlink_to(ds.root, target_is_directory=True)
    ds.basepath = link
    return ["PASSED"]


def symlinked_case_files(ds: TinyDataset, outside: Path) -> list[str]:
    """Every image and label a link into shared storage outside the dataset folder (how big datasets are
    often assembled): inside the dataset all the same."""
    store = outside / "store"
    store.mkdir()
    for path in [*(ds.root / "imagesTr").iterdir(), *(ds.root / "labelsTr").iterdir()]:
        moved = store / path.name
        shutil.move(path, moved)
        path.symlink_to(moved)
    return ["PASSED"]


def unusual_paths_end_to_end(ds: TinyDataset, outside: Path) -> list[str]:
    """All three at once (and brackets, which Hydra's grammar needs quoted), through planning: the cache
    must be written and named safely."""
    keep_one_channel(ds)
    symlinked_case_files(ds, outside)
    _move(ds, outside / "dätä sét ü 日本" / "Dataset 001 (v2) [final], ñ")
    symlinked_dataset_folder(ds, outside)
    return ["plans.json"]


DATASET_CASES = [
    DatasetCase("truncated_image", truncated_image),
    DatasetCase("garbage_bytes_named_nii_gz", garbage_bytes),
    DatasetCase("garbage_inside_valid_gzip", garbage_inside_gzip),
    DatasetCase("empty_label_file", empty_file),
    DatasetCase("image_2d", image_2d),
    DatasetCase("image_4d", image_4d),
    DatasetCase("image_nan", image_nan),
    DatasetCase("image_inf", image_inf),
    DatasetCase("label_shape_mismatch", label_shape_mismatch),
    DatasetCase("spacing_mismatch", spacing_mismatch),
    # nnU-Net warns here too: voxels may still align, and training works in voxel space
    DatasetCase("affine_direction_mismatch", affine_direction_mismatch, outcome="warning"),
    DatasetCase("label_values_outside_declared_set", label_outside_set),
    DatasetCase("empty_images_folder", empty_images_folder),
    DatasetCase("missing_labels_folder", missing_labels_folder),
    DatasetCase("missing_channel_file", missing_channel_file),
    DatasetCase("json_missing_labels", _json_breaker("'labels' is missing", drop=("labels",))),
    DatasetCase("json_missing_channel_names", _json_breaker("'channel_names' is missing", drop=("channel_names",))),
    DatasetCase("json_missing_file_ending", _json_breaker("['file_ending'] missing", drop=("file_ending",))),
    DatasetCase("json_missing_num_training", _json_breaker("['numTraining'] missing", drop=("numTraining",))),
    DatasetCase("json_labels_as_list", _json_breaker("'labels' is missing or malformed",
                                                     labels=["background", "organ", "vessel"])),
    DatasetCase("json_num_training_as_string", _json_breaker("numTraining must be an integer, got '3'",
                                                             numTraining="3")),
    DatasetCase("json_channel_names_not_a_dict", _json_breaker("'channel_names' is missing or not an object",
                                                               channel_names=["T1", "T2"])),
    DatasetCase("num_training_not_matching_files", num_training_mismatch),
    DatasetCase("dangling_image_symlink", dangling_image_symlink),
    DatasetCase("dangling_label_symlink", dangling_label_symlink),
    DatasetCase("symlink_loop", symlink_loop),
    DatasetCase("symlink_out_of_the_dataset_to_a_non_image", symlink_to_foreign_file),
    # Hydra's grammar takes non-ASCII letters only in quotes; unquoted, the error says how (a config row)
    DatasetCase("unicode_and_spaces_in_path", unicode_and_spaces, outcome="ok", quoted=True),
    DatasetCase("symlinked_dataset_folder", symlinked_dataset_folder, outcome="ok"),
    DatasetCase("symlinked_case_files", symlinked_case_files, outcome="ok"),
    DatasetCase("unusual_paths_planned_end_to_end", unusual_paths_end_to_end, outcome="ok", command="plan",
                overrides=("splits.n_folds=3",), quoted=True),
]

CONFIG_CASES = [
    ConfigCase("unknown_key", "plan", ("unknown_key=1",), ("unknown_key",)),
    ConfigCase("misspelt_nested_key", "train", ("trainer.max_epoch=3",), ("trainer.max_epoch",)),
    ConfigCase("unknown_scheduler_option", "train", ("lr_scheduler=nope",), ("lr_scheduler=nope", "step_lr")),
    ConfigCase("unknown_model_option", "plan", ("model=nope",), ("model=nope", "plain_conv_unet_3d")),
    ConfigCase("ill_typed_value", "train", ("trainer.max_epochs=abc",), ("trainer.max_epochs", "'abc'")),
    ConfigCase("patch_size_of_wrong_dimension", "plan", ("patch_size=[64,64]",), ("patch_size=[64, 64]", "3D")),
    ConfigCase("fold_out_of_range", "train", ("fold=7",), ("fold=7", "0..4")),
    ConfigCase("derived_n_stages", "train", ("model.model_args.n_stages=3",), ("model.model_args.n_stages", "derived")),
    ConfigCase("derived_num_classes", "train", ("num_classes=9",), ("num_classes", "derived")),
    ConfigCase("pathfinder_not_registered", "verify", ("dataset.pathfinder=nope",),
               ("dataset.pathfinder='nope'", "nnunet"), with_dataset=False),
    ConfigCase("scheduler_as_import_path", "train", ("lr_scheduler.type=torch.optim.lr_scheduler.StepLR",),
               ("lr_scheduler.type=", "not a registered scheduler", "PolyLR")),
    ConfigCase("scheduler_target_appended", "train", ("+lr_scheduler._target_=torch.optim.lr_scheduler.StepLR",),
               ("lr_scheduler._target_", "registries")),
    ConfigCase("override_grammar_error", "plan", ("fold=[1,",), ("fold=[1,", "no viable alternative")),
    ConfigCase("unquoted_unicode_path", "verify", ("dataset.basepath=/data/Dätäsét 01",),
               ("dataset.basepath=/data/Dätäsét 01", "must be quoted", "\"dataset.basepath='/data/Dätäsét 01'\""),
               with_dataset=False),
]


# -- running the selected rows together ---------------------------------------------------------------------
def _selected(request: pytest.FixtureRequest, param: str) -> list[str]:
    """Names of the table rows this session runs, so `-k one_row` launches one process, not all."""
    names = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and getattr(item, "module", None) is request.module and param in callspec.params:
            names.append(callspec.params[param].name)
    return names


def _hydra_value(path: Path, quoted: bool) -> str:
    """The path as an override value; quoted as Hydra's grammar reads quotes (backslash escapes)."""
    if not quoted:
        return str(path)
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dataset_run(case: DatasetCase, base: TinyDataset, folder: Path) -> Run:
    outside, work = folder / "outside", folder / "work"
    outside.mkdir(parents=True)
    work.mkdir()
    ds = copy_dataset(base, folder / "Dataset001_Tiny")
    words = case.breaker(ds, outside)
    before = ds.files()
    basepath = _hydra_value(ds.basepath, case.quoted)
    result = run_viseg(case.module, f"dataset.basepath={basepath}", "num_processes=1", f"paths.cache={work / 'cache'}",
                       f"paths.results={work / 'results'}", *case.overrides, cwd=work)
    return Run(result, work, words, before, ds)


def _config_run(case: ConfigCase, base: TinyDataset, folder: Path) -> Run:
    work = folder / "work"
    work.mkdir(parents=True)
    dataset = [f"dataset.basepath={base.basepath}"] if case.with_dataset else []
    result = run_viseg(case.module, *dataset, "num_processes=1", f"paths.cache={work / 'cache'}",
                       f"paths.results={work / 'results'}", *case.overrides, cwd=work)
    return Run(result, work, list(case.words))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> TinyDataset:
    return make_tiny_dataset(tmp_path_factory.mktemp("base") / "Dataset001_Tiny")


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, base: TinyDataset, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every selected row of both tables, run in parallel once per module."""
    base_files = base.files()
    datasets, configs = set(_selected(request, "case")), set(_selected(request, "config_case"))
    jobs: dict[str, Callable[[], Run]] = {}
    for case in DATASET_CASES:
        if case.name in datasets:
            jobs[case.name] = lambda c=case: _dataset_run(c, base, tmp_path_factory.mktemp(c.name))
    for config in CONFIG_CASES:
        if config.name in configs:
            jobs[config.name] = lambda c=config: _config_run(c, base, tmp_path_factory.mktemp(c.name))
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        done = {name: future.result() for name, future in futures.items()}
    assert base.files() == base_files  # config rows share the base dataset: none may touch it
    return done


# -- what every refusal must look like ------------------------------------------------------------------------
def written(work: Path) -> list[Path]:
    return sorted(work.rglob("*"))


def fix_after(output: str, anchor: str) -> str | None:
    """The `fix:` line of the message (or report entry) whose text names `anchor`."""
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if anchor in line:
            for following in lines[index:index + 4]:
                match = re.search(r"fix: (\S.*)", following)
                if match:
                    return match.group(1)
    return None


def assert_clean_refusal(run: Run) -> None:
    output = run.output
    assert run.result.returncode == 2, output
    assert "Traceback" not in output, output
    assert run.result.stderr.count("error:") == 1, output  # one message (a dataset's is one report)
    for word in run.words:
        assert word in output, f"{word!r} not in:\n{output}"
    assert fix_after(output, run.words[0]), f"no fix given for {run.words[0]!r}:\n{output}"
    assert written(run.work) == [], written(run.work)  # no cache, no results, no demo dataset


def assert_cached_under_a_safe_name(run: Run) -> None:
    """A planned dataset's cache folder carries none of its path's oddities (spaces, unicode, quotes)."""
    [plans] = (run.work / "cache").rglob("plans.json")
    dataset_folder = plans.relative_to(run.work / "cache").parts[0]
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", dataset_folder), dataset_folder
    assert not (run.work / "results").exists()


# -- the tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", DATASET_CASES, ids=lambda c: c.name)
def test_dataset(runs: dict, case: DatasetCase) -> None:
    run = runs[case.name]
    output = run.output
    assert "Traceback" not in output, output
    if case.outcome == "error":
        assert_clean_refusal(run)
        assert "FAILED" in run.result.stderr
    elif case.outcome == "warning":
        assert run.result.returncode == 0, output
        assert "PASSED with 1 warning" in run.result.stdout
        assert all(word in output for word in run.words), output
        assert fix_after(output, run.words[0]), output
    else:
        assert run.result.returncode == 0, output
        assert all(word in output for word in run.words), output
    if case.module == "plan" and case.outcome == "ok":
        assert_cached_under_a_safe_name(run)
    assert run.dataset is not None and run.dataset.files() == run.dataset_before  # the dataset is never touched


@pytest.mark.parametrize("config_case", CONFIG_CASES, ids=lambda c: c.name)
def test_config(runs: dict, config_case: ConfigCase) -> None:
    run = runs[config_case.name]
    assert_clean_refusal(run)
    assert run.result.stderr.startswith(f"viseg {config_case.module}: error: "), run.output

