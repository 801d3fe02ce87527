"""The demo dataset: deterministic, readable by viseg's pathfinder and reader, and shaped as documented."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from viseg.data.demo import (
    MARKER,
    DemoSpec,
    demo_dataset_dir,
    ensure_demo_dataset,
    generate_demo_dataset,
)
from viseg.data.nifti import read_case
from viseg.data.pathfinders import DefaultNNUnetFormatPathFinder
from viseg.demo import main
from viseg.errors import ConfigError
from viseg.io.jsonio import read_json, write_json_atomic

N_CASES = 4


def _read_all(root: Path) -> list:
    discovery = DefaultNNUnetFormatPathFinder(root).discover()
    assert discovery.problems == []
    return [read_case(case) for case in discovery.cases]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "ds"
    return generate_demo_dataset(out, DemoSpec(N_CASES, seed=0), progress=False)


@pytest.fixture(scope="module")
def demo_arrays(demo: Path) -> list:
    return _read_all(demo)


def test_discovery_finds_all_cases_without_problems(demo: Path) -> None:
    discovery = DefaultNNUnetFormatPathFinder(demo).discover()
    assert discovery.problems == []
    assert [c.case_id for c in discovery.cases] == [f"demo_{i:03d}" for i in range(N_CASES)]
    assert discovery.info is not None
    assert discovery.info.channel_names == ("MRI",)
    assert discovery.info.labels == {"background": 0, "organ": 1, "vessel": 2, "lesion": 3}
    assert discovery.info.num_training == N_CASES
    assert read_json(demo / MARKER)["spec"] == {"n_cases": N_CASES, "seed": 0}
    assert not [p for p in demo.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_same_seed_same_arrays_other_seed_differs(tmp_path: Path, demo_arrays: list) -> None:
    # Fewer cases from the same seed: the same first cases (case i does not depend on n_cases).
    again = _read_all(generate_demo_dataset(tmp_path / "again", DemoSpec(2, seed=0), progress=False))
    for first, second in zip(demo_arrays[:2], again, strict=True):
        assert first.image.tobytes() == second.image.tobytes()
        assert first.label.tobytes() == second.label.tobytes()
        assert first.spacing == second.spacing
    other = _read_all(generate_demo_dataset(tmp_path / "other", DemoSpec(2, seed=1), progress=False))
    assert all(a.image.shape != b.image.shape or not np.array_equal(a.image, b.image)
               for a, b in zip(demo_arrays[:2], other, strict=True))


def test_every_case_has_all_labels_and_lesions_strictly_inside_the_organ(demo_arrays: list) -> None:
    for case in demo_arrays:
        label = case.label
        counts = np.bincount(label.ravel(), minlength=4)
        assert len(counts) == 4 and (counts[1:] > 0).all(), counts
        assert counts[3] >= 10
        lesion = label == 3
        shell = ndimage.binary_dilation(lesion) & ~lesion
        # surrounded by organ only: neither on the vessel nor touching the background
        assert set(np.unique(label[shell]).tolist()) == {1}


def test_shapes_spacings_and_intensity_contrast(demo_arrays: list) -> None:
    for case in demo_arrays:
        z, y, x = case.image.shape[1:]
        assert 14 <= z <= 20 and 48 <= y <= 64 and 48 <= x <= 64
        sz, sy, sx = case.spacing
        assert sz > 3 * max(sy, sx)
        np.testing.assert_allclose(case.spacing, (4.0, 1.0, 1.0), rtol=0.0501)
        means = [case.image[0][case.label == k].mean() for k in range(4)]
        assert means == sorted(means)  # background < organ < vessel < lesion


def test_nifti_headers_and_dtypes(demo: Path) -> None:
    image = nib.load(str(demo / "imagesTr" / "demo_000_0000.nii.gz"))
    label = nib.load(str(demo / "labelsTr" / "demo_000.nii.gz"))
    assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
    sx, sy, sz = image.header.get_zooms()
    np.testing.assert_allclose(image.affine, np.diag([sx, sy, sz, 1.0]))
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    assert image.shape == label.shape and image.shape[2] < image.shape[0]  # stored (x, y, z)


def test_ensure_is_idempotent_and_regenerates_stale(tmp_path: Path) -> None:
    spec = DemoSpec(2, seed=3)
    path = ensure_demo_dataset(tmp_path, spec, progress=False)
    assert path == demo_dataset_dir(tmp_path, spec) and path.is_relative_to(tmp_path / "demo")
    before = (path / "dataset.json").stat()
    assert ensure_demo_dataset(tmp_path, spec, progress=False) == path
    after = (path / "dataset.json").stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)

    write_json_atomic(path / MARKER, {"version": -1, "spec": {"n_cases": 2, "seed": 3}})  # an older generator
    assert ensure_demo_dataset(tmp_path, spec, progress=False) == path
    assert (path / "dataset.json").stat().st_ino != before.st_ino
    assert read_json(path / MARKER)["version"] != -1

    other = ensure_demo_dataset(tmp_path, DemoSpec(3, seed=3), progress=False)
    assert other != path and len(list((other / "labelsTr").iterdir())) == 3


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("not a demo dataset")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_demo_dataset(tmp_path, DemoSpec(1), progress=False)
    assert (tmp_path / "mine.txt").is_file()
    with pytest.raises(ConfigError):
        DemoSpec(n_cases=0)


def test_cli_writes_cases_and_prints_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--n-cases", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path)
    assert len(DefaultNNUnetFormatPathFinder(tmp_path).discover().cases) == 3
    inode = (tmp_path / "dataset.json").stat().st_ino
    assert main(["--out", str(tmp_path), "--n-cases", "3", "--quiet"]) == 0  # up to date: reused
    assert (tmp_path / "dataset.json").stat().st_ino == inode
    assert main(["--out", str(tmp_path), "--n-cases", "3", "--quiet", "--force"]) == 0
    assert (tmp_path / "dataset.json").stat().st_ino != inode
    assert main(["--out", str(tmp_path), "--n-cases", "0"]) == 2
    assert "n_cases" in capsys.readouterr().err


def test_cli_default_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--n-cases", "1", "--seed", "5", "--quiet"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == demo_dataset_dir(Path(".viseg_cache"), DemoSpec(1, seed=5))
    assert (tmp_path / printed / "dataset.json").is_file()
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0 and "lesion" in capsys.readouterr().out
