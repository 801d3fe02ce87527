"""Inputs built to hurt: headers that lie about their size, spacings in the wrong unit, names that climb out of
their folder, planted links at temporary names, two files for one case (issue 13, items 9 and 10).

Every file here is real (tiny NIfTIs written with nibabel, a lying header written as raw bytes in a real gzip
stream) and the prediction test runs `python -m viseg.predict` on a run trained for one iteration.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import compose_typed
from tests.reliability.tiny import SHAPE, make_tiny_dataset, run_viseg, write_nifti
from viseg.errors import ConfigError, DatasetError

REPO = Path(__file__).resolve().parents[2]

CLAIMED = (4096, 4096, 4096)  # float32: 256 GiB of voxel data
# 128 KiB: a tiny case (6 x 12 x 12 float32, 3 KiB) passes; grown 100x (2d, in plane) or 1000x (3d) it does not
BUDGET_GB = 1 / 8192


def lying_header(path: Path, shape: tuple[int, ...] = CLAIMED, dtype: type = np.float32,
                 compress: bool = True) -> Path:
    """A valid NIfTI-1 header whose dim field claims `shape`, followed by a few voxels' worth of bytes: a few
    hundred bytes on disk, gzip-compressed when `compress` (a real stream gzip reads without complaint)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_zooms((1.0,) * len(shape))
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + np.zeros(16, dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISEG_MAX_IMAGE_GB", str(BUDGET_GB))


# -- size guards: the header --------------------------------------------------------------------------------


@pytest.mark.parametrize("read", ["read_header", "read_voxels"])
def test_a_header_claiming_more_than_gzip_can_hold_is_refused_before_any_voxel_is_read(tmp_path: Path, read: str):
    from viseg.data import nifti as io

    path = lying_header(tmp_path / "bomb_0000.nii.gz")
    assert path.stat().st_size < 400
    with pytest.raises(DatasetError) as error:
        getattr(io, read)(path)  # before the guard, read_voxels asked gzip for 256 GiB at once
    message = str(error.value)
    assert str(path) in message and "4096x4096x4096 voxels of float32" in message and "256 GiB" in message
    assert "gzip" in message and error.value.fix


def test_an_uncompressed_file_shorter_than_its_header_claims_is_refused(tmp_path: Path):
    from viseg.data.nifti import read_header

    path = lying_header(tmp_path / "short.nii", shape=(64, 64, 64), compress=False)
    with pytest.raises(DatasetError, match=r"64x64x64 voxels of float32 \(1 MiB of voxel data\), but the file "
                                           r"holds 416 bytes") as error:
        read_header(path)
    assert str(path) in str(error.value) and error.value.fix


def test_an_honest_volume_over_the_memory_budget_is_refused_and_names_the_setting(tmp_path: Path,
                                                                                small_budget: None):
    from viseg.data.dataset import Case, ImageSource
    from viseg.data.nifti import read_case, read_header

    honest = tmp_path / "honest.nii.gz"
    write_nifti(np.random.default_rng(0).normal(size=(16, 64, 64)).astype(np.float32), honest)  # 256 KiB
    with pytest.raises(DatasetError) as error:
        read_case(Case("honest", (ImageSource(honest),), label=None))
    assert str(honest) in error.value.message and "VISEG_MAX_IMAGE_GB" in error.value.message
    assert "VISEG_MAX_IMAGE_GB=" in (error.value.fix or "")
    small = tmp_path / "small.nii.gz"
    write_nifti(np.zeros(SHAPE, np.float32), small)
    assert read_header(small).shape_zyx == SHAPE  # well under the budget: read as before


@pytest.mark.parametrize("value", ["lots", "0", "-1", "nan"])
def test_a_malformed_budget_is_a_config_error_naming_the_variable(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch, value: str):
    from viseg.data.nifti import read_header

    path = tmp_path / "small.nii.gz"
    write_nifti(np.zeros(SHAPE, np.float32), path)
    monkeypatch.setenv("VISEG_MAX_IMAGE_GB", value)
    with pytest.raises(ConfigError, match="VISEG_MAX_IMAGE_GB"):
        read_header(path)


def test_verify_reports_the_lying_header_with_the_other_cases_checked(tmp_path: Path):
    """verify (and so plan, fingerprint, preprocess) reads through the same guard: one report, no MemoryError."""
    ds = make_tiny_dataset(tmp_path / "Dataset001_Tiny")
    lying_header(ds.image("case_001", 1))
    result = run_viseg("verify", f"dataset.basepath={ds.root}", "num_processes=1",
                       f"paths.cache={tmp_path / 'cache'}", f"paths.results={tmp_path / 'results'}", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output and "MemoryError" not in output, output
    assert "case_001_0001.nii.gz" in output and "4096x4096x4096 voxels of float32" in output, output
    assert "1 error" in output, output  # the lying file alone: the other cases and channels passed


# -- size guards: resampling --------------------------------------------------------------------------------


def test_a_spacing_in_cm_written_as_mm_is_refused_before_resampling_allocates():
    """A CT of 100 x 512 x 512 at (2.5, 0.7, 0.7) mm whose header says (25, 7, 7): 1000x the voxels, 105 GB."""
    from viseg.planning.geometry import compute_new_shape
    from viseg.preprocessing.resampling import check_resampled_size

    target = (2.5, 0.7, 0.7)
    check_resampled_size("ct_ok", (100, 512, 512), compute_new_shape((100, 512, 512), target, target), 1, target,
                         target)
    wrong = (25.0, 7.0, 7.0)
    new_shape = compute_new_shape((100, 512, 512), wrong, target)
    with pytest.raises(DatasetError) as error:
        check_resampled_size("ct_cm", (100, 512, 512), new_shape, 1, wrong, target)
    message = error.value.message
    assert "case ct_cm" in message and "[25.0, 7.0, 7.0]" in message and "[2.5, 0.7, 0.7]" in message
    assert "(1000, 5120, 5120)" in message and "1e+03x the voxels" in message
    assert "unit" in (error.value.fix or "") and "cm" in (error.value.fix or "")


def test_preprocessing_a_case_names_it_when_its_resampled_size_exceeds_the_budget(tmp_path: Path,
                                                                                small_budget: None):
    from viseg.preprocessing.prepare import prepare
    from viseg.preprocessing.preprocess import preprocess_case

    ds = make_tiny_dataset(tmp_path / "Dataset001_Tiny", channels=("MRI",))
    cfg = compose_typed("anatomy_config", [
        f"dataset.basepath={ds.root}", f"paths.cache={tmp_path / 'cache'}", f"paths.results={tmp_path / 'r'}",
        "splits.n_folds=3", "num_processes=1"])
    prepared = prepare(cfg, progress=False)
    image = np.random.default_rng(0).normal(100, 10, (1, *SHAPE)).astype(np.float32)
    spacing = tuple(float(s) for s in prepared.plans.configuration(prepared.configuration).spacing)
    preprocess_case(image, None, spacing, prepared.plans, prepared.configuration, case_id="mm")  # 3 KiB: fine
    with pytest.raises(DatasetError, match="case in_cm:") as error:
        preprocess_case(image, None, tuple(10 * s for s in spacing), prepared.plans, prepared.configuration,
                        case_id="in_cm")
    assert "VISEG_MAX_IMAGE_GB" in error.value.message and "spacing" in (error.value.fix or "")


# -- predict: every case checked, every failure its own ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run folder, a training image): one channel, trained for a single iteration (predict needs weights, not
    good ones)."""
    from viseg.training.train import train

    work = tmp_path_factory.mktemp("hostile_run")
    ds = make_tiny_dataset(work / "Dataset001_Tiny", channels=("MRI",))
    cfg = compose_typed("anatomy_config", [
        f"dataset.basepath={ds.root}", f"paths.cache={work / 'cache'}", f"paths.results={work / 'results'}",
        "splits.n_folds=3", "num_processes=1", "loader.num_workers=0", "trainer.max_epochs=1",
        "trainer.iterations_per_epoch=1", "trainer.val_iterations=1"])
    return train(cfg, progress=False).run_dir, ds.image("case_000", 0)


@pytest.mark.slow
def test_predict_fails_the_hostile_cases_alone_and_writes_the_good_one(tiny_run: tuple[Path, Path], tmp_path: Path,
                                                                       small_budget: None):
    run_dir, good = tiny_run
    inputs = tmp_path / "input"
    inputs.mkdir()
    shutil.copyfile(good, inputs / "good_0000.nii.gz")
    lying_header(inputs / "bomb_0000.nii.gz")
    image = nib.load(good)
    cm = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine @ np.diag([10.0, 10.0, 10.0, 1.0]))
    nib.save(cm, str(inputs / "in_cm_0000.nii.gz"))  # every spacing 10x: 1000x the voxels at resampling
    nan = np.asanyarray(image.dataobj).copy()
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, image.affine), str(inputs / "nan_0000.nii.gz"))
    result = run_viseg("predict", f"model={run_dir}", f"input={inputs}", f"output={tmp_path / 'out'}",
                       "device=cpu", "mirror=false", cwd=tmp_path)  # the budget reaches it through the environment
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "3 of 4 case(s) failed" in output, output
    assert f"{inputs / 'bomb_0000.nii.gz'}: its header claims 4096x4096x4096 voxels" in output, output
    assert "case in_cm: its header spacing" in output and "unit in the header" in output, output
    assert f"{inputs / 'nan_0000.nii.gz'}: channel 0 has 1 NaN or infinite voxel(s)" in output, output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]


@pytest.mark.slow
def test_any_exception_fails_only_its_case(tiny_run: tuple[Path, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch):
    """A MemoryError (or any bug) is no VisegError: before, the first one ended the whole folder."""
    from viseg.data import nifti as io
    from viseg.data.prediction_inputs import find_cases
    from viseg.inference.ensemble import load_ensemble
    from viseg.inference.predict import InferenceOptions, predict_cases

    run_dir, good = tiny_run
    inputs = tmp_path / "input"
    inputs.mkdir()
    for name in ("a_0000.nii.gz", "huge_0000.nii.gz", "z_0000.nii.gz"):
        shutil.copyfile(good, inputs / name)
    real_read_case = io.read_case

    def out_of_memory_for_huge(case, with_label=True):
        if case.case_id == "huge":
            raise MemoryError("Unable to allocate 256. GiB for an array")
        return real_read_case(case, with_label)

    monkeypatch.setattr(io, "read_case", out_of_memory_for_huge)
    ensemble = load_ensemble([run_dir], "final", "cpu")
    cases = find_cases(str(inputs), ensemble.plans.channel_names, ensemble.pathfinder)
    report = predict_cases(ensemble, cases, tmp_path / "out", InferenceOptions(mirror=False), progress=False)
    assert report.predicted == ["a", "z"]
    assert list(report.failures) == ["huge"]
    assert str(inputs / "huge_0000.nii.gz") in report.failures["huge"]
    assert "out of memory" in report.failures["huge"] and "MemoryError" in report.failures["huge"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "z.nii.gz"]


def test_predict_checks_headers_before_reading_voxels(tmp_path: Path):
    """Dimensions, channels and spacing, for inputs that never went through verify."""
    from viseg.data.dataset import Case, ImageSource
    from viseg.data.prediction_inputs import check_case_headers

    three_d, four_d, flat = tmp_path / "a_0000.nii.gz", tmp_path / "b.nii.gz", tmp_path / "c_0000.nii.gz"
    write_nifti(np.zeros(SHAPE, np.float32), three_d)
    write_nifti(np.zeros((3, *SHAPE), np.float32), four_d)  # reversed on writing: (x, y, z, 3)
    header = nib.Nifti1Header()  # no affine: the pixdim field alone gives the spacing, and it says NaN
    header.set_data_shape(SHAPE[::-1])
    header["pixdim"][1:4] = [1.0, 1.0, np.nan]
    nib.save(nib.Nifti1Image(np.zeros(SHAPE[::-1], np.float32), None, header=header), str(flat))
    check_case_headers(Case("a", (ImageSource(three_d),), None), 1)
    with pytest.raises(DatasetError, match=r"b.nii.gz is 4D.* x 3 channels; the model takes a 4D volume of 2"):
        check_case_headers(Case("b", (ImageSource(four_d, 0), ImageSource(four_d, 1)), None), 2)
    with pytest.raises(DatasetError, match=r"b.nii.gz is 4D.*the model takes one 3D volume"):
        check_case_headers(Case("b", (ImageSource(four_d),), None), 1)
    with pytest.raises(DatasetError, match=r"c_0000.nii.gz has spacing .* positive finite"):
        check_case_headers(Case("c", (ImageSource(flat),), None), 1)
    with pytest.raises(DatasetError, match="4096x4096x4096"):
        check_case_headers(Case("d", (ImageSource(lying_header(tmp_path / "d_0000.nii.gz")),), None), 1)


# -- names and paths ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", ".hidden", "", "x..y", "a\\b"])
def test_names_that_leave_their_folder_are_refused(name: str):
    from viseg.config import check_folder_name

    for key in ("name", "experiment"):
        with pytest.raises(ConfigError, match=f"^{key}=") as error:
            check_folder_name(key, name)
        assert error.value.fix and key in error.value.fix
    assert check_folder_name("name", "lr-0.01_ 名前") == "lr-0.01_ 名前"


@pytest.mark.parametrize("name", ["../../escape", "..", "a/b"])
def test_sweep_refuses_an_experiment_that_escapes_storage_path(tmp_path: Path, name: str):
    result = subprocess.run([sys.executable, "-m", "viseg.sweep", f"experiment={name}",
                             f"storage_path={tmp_path / 'sweeps'}", "dry_run=true"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    assert f"experiment={name!r}" in output and "fix:" in output, output
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("name", ["../../escape", ".."])
def test_train_refuses_a_name_that_escapes_paths_results(tmp_path: Path, name: str):
    ds = make_tiny_dataset(tmp_path / "Dataset001_Tiny", channels=("MRI",))
    work = tmp_path / "work"
    work.mkdir()
    result = run_viseg("train", f"dataset.basepath={ds.root}", f"name={name}", f"paths.cache={work / 'cache'}",
                       f"paths.results={work / 'results'}", cwd=work)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    assert f"name={name!r}" in output and "fix:" in output, output
    assert sorted(p.name for p in work.iterdir()) == []  # refused at composition: nothing written anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001_Tiny", "work"]


def test_a_link_planted_at_the_temporary_name_is_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from viseg.io import atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "run" / "config.yaml"
    target.parent.mkdir()
    planted = target.parent / ".config.yaml.planted.tmp"
    planted.symlink_to(victim)
    monkeypatch.setattr(atomic, "temporary_name", lambda path, keep_ending=False: planted)
    with pytest.raises(OSError):
        atomic.write_text_atomically(target, "written through the link")
    assert victim.read_text() == "precious" and not target.exists()
    assert planted.is_symlink()  # not ours: left where it was, for whoever investigates


def test_a_link_swapped_in_while_writing_is_not_installed(tmp_path: Path):
    from viseg.io.atomic import write_atomically

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")

    def swap(tmp: Path) -> None:
        tmp.unlink()
        tmp.symlink_to(victim)

    with pytest.raises(OSError, match="became a symbolic link"):
        write_atomically(tmp_path / "state.json", swap)
    assert not (tmp_path / "state.json").exists() and victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_temporary_names_are_unique_across_hosts_and_calls(tmp_path: Path):
    import socket

    from viseg.io.atomic import temporary_name

    names = {temporary_name(tmp_path / "last.ckpt") for _ in range(50)}
    assert len(names) == 50
    name = next(iter(names)).name
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())[:32]
    assert name.startswith(f".last.ckpt.{host}.") and name.endswith(f".{os.getpid()}.tmp")
    assert name.rsplit(".", 2)[-2] == str(os.getpid())  # where the preprocessing cache reads the writer's pid
    assert temporary_name(tmp_path / "p.png", keep_ending=True).name.endswith(".tmp.p.png")


def test_two_files_for_one_decathlon_case_are_refused_naming_both(tmp_path: Path):
    """`a.nii` and `a.nii.gz` are both case `a`: the second prediction would overwrite the first."""
    from viseg.data.prediction_inputs import find_cases

    folder = tmp_path / "input"
    folder.mkdir()
    for name in ("a.nii", "a.nii.gz", "b.nii.gz"):
        write_nifti(np.zeros(SHAPE, np.float32), folder / name)
    cases = find_cases(str(folder), ("MRI",), "decathlon")
    assert [c.case_id for c in cases] == ["a", "b"]
    assert cases[0].case is None and str(folder / "a.nii") in cases[0].problem
    assert str(folder / "a.nii.gz") in cases[0].problem and cases[1].case is not None


def test_the_decathlon_pathfinder_names_both_files_of_a_duplicated_case(tmp_path: Path):
    from viseg.data.pathfinders import get_pathfinder

    root = tmp_path / "Task01"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for ending in (".nii", ".nii.gz"):
        write_nifti(np.zeros(SHAPE, np.float32), root / "imagesTr" / f"a{ending}")
        write_nifti(np.zeros(SHAPE, np.uint8), root / "labelsTr" / f"a{ending}")
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "organ"},
        "training": [{"image": f"./imagesTr/a{e}", "label": f"./labelsTr/a{e}"} for e in (".nii", ".nii.gz")]}))
    discovery = get_pathfinder("decathlon", root).discover()
    duplicates = [p for p in discovery.problems if p.check == "duplicate-case"]
    assert len(discovery.cases) == 1 and len(duplicates) == 1
    assert "a.nii and" in duplicates[0].message and "a.nii.gz" in duplicates[0].message


def test_the_nnunet_pathfinder_refuses_two_label_files_for_one_case(tmp_path: Path):
    from viseg.data.pathfinders import get_pathfinder

    ds = make_tiny_dataset(tmp_path / "Dataset001_Tiny", channels=("MRI",))
    write_nifti(np.zeros(SHAPE, np.uint8), ds.root / "labelsTr" / "case_001.nii")
    problems = get_pathfinder("nnunet", ds.root).discover().problems
    duplicates = [p for p in problems if p.check == "duplicate-case"]
    assert len(duplicates) == 1 and duplicates[0].severity == "error"
    assert "case_001.nii " in duplicates[0].message and "case_001.nii.gz" in duplicates[0].message
