"""Nothing a config, a dataset or a checkpoint says can make viseg import or run code, or read outside the
dataset folder.

(a) names resolve only through viseg's registries: a dotted import path is refused and never imported (a
    payload module on sys.path leaves a marker file if anything imports it);
(b) a static check of viseg's own source for the calls that would break that (eval, pickle, torch.load
    without weights_only, dynamic imports, unsafe YAML, shell=True), itself tested on bad snippets;
(c) dataset.json paths that leave the dataset folder are refused;
(d) a checkpoint carrying a pickled object that runs code on load is refused by every loader, and its code
    never runs (the marker file it would create stays absent).
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import compose_typed
from tests.reliability.tiny import REPO, TinyDataset, make_tiny_dataset, run_viseg, valid_label, write_nifti
from viseg.config import BaseConfig
from viseg.data.dataset import DatasetInfo
from viseg.errors import ConfigError
from viseg.preprocessing.prepare import PreparedDataset, dataset_cache_dir

VISEG = REPO / "viseg"


# -- (a) registries only --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Payload:
    """A module that, if anything ever imports it, writes `marker`; its attributes stand for the callables
    an attacker would name (`run` as a scheduler, `Popen` as a model, `Finder` as a pathfinder)."""

    name: str
    folder: Path
    marker: Path

    def path(self, attribute: str) -> str:
        return f"{self.name}.{attribute}"


@pytest.fixture
def payload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Payload:
    folder, marker = tmp_path / "payload", tmp_path / "imported.marker"
    folder.mkdir()
    name = f"viseg_payload_{uuid.uuid4().hex[:12]}"
    (folder / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "def run(*args, **kwargs):\n    return None\n\nclass Popen:\n    pass\n\nclass Finder:\n    pass\n")
    monkeypatch.syspath_prepend(str(folder))
    return Payload(name, folder, marker)


def assert_never_imported(payload: Payload) -> None:
    assert payload.name not in sys.modules
    assert not payload.marker.exists()


def test_the_payload_is_live(payload: Payload) -> None:
    """The control: importing the payload does leave the marker, so its absence elsewhere means something."""
    subprocess.run([sys.executable, "-c", f"import {payload.name}"], check=True, cwd=payload.folder)
    assert payload.marker.read_text() == "imported"


@pytest.mark.parametrize(("key", "attribute", "message"), [
    ("lr_scheduler.type", "run", "not a registered scheduler"),
    ("model.model_cls", "Popen", "not a registered architecture"),
    ("dataset.pathfinder", "Finder", "not a registered layout"),
    ("+lr_scheduler._target_", "run", "registries"),
    ("+model._target_", "Popen", "registries"),
])
def test_config_import_paths_are_refused_in_process(payload: Payload, key: str, attribute: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_typed("anatomy_config", [f"{key}={payload.path(attribute)}"])
    assert_never_imported(payload)


def test_registry_lookups_never_import(payload: Payload) -> None:
    from viseg.data.pathfinders import get_pathfinder
    from viseg.planning.architectures import get_architecture
    from viseg.schedulers import build_scheduler

    with pytest.raises(ConfigError, match="unknown architecture"):
        get_architecture(payload.path("Popen"))
    with pytest.raises(ConfigError, match="not a registered layout"):
        get_pathfinder(payload.path("Finder"), payload.folder)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"unknown lr_scheduler\.type"):
        build_scheduler(payload.path("run"), optimizer, {}, 10)
    assert_never_imported(payload)


CLI_IMPORT_PATHS = [  # (module, override); the ones the issue names, spelt the ways a user might
    ("train", "lr_scheduler.name={}.run"),
    ("train", "lr_scheduler.type={}.run"),
    ("train", "+lr_scheduler._target_={}.run"),
    ("train", "model.architecture={}.Popen"),
    ("plan", "model.model_cls={}.Popen"),
    ("verify", "dataset.pathfinder={}.Finder"),
]


def test_command_lines_refuse_import_paths(payload: Payload, tmp_path: Path) -> None:
    """The real commands, with the payload importable (on PYTHONPATH): each exits 2 with a message, runs
    nothing, writes nothing."""
    base = make_tiny_dataset(tmp_path / "Dataset001_Tiny")

    def run(job: tuple[int, tuple[str, str]]) -> tuple[str, subprocess.CompletedProcess[str], Path]:
        index, (module, override) = job
        work = tmp_path / f"work{index}"
        work.mkdir()
        result = run_viseg(module, f"dataset.basepath={base.root}", f"paths.cache={work / 'cache'}",
                           f"paths.results={work / 'results'}", override.format(payload.name), cwd=work,
                           extra_pythonpath=payload.folder)
        return override, result, work

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(run, enumerate(CLI_IMPORT_PATHS)))
    for override, result, work in outcomes:
        output = result.stdout + result.stderr
        assert result.returncode == 2, (override, output)
        assert "Traceback" not in output and "fix:" in output, (override, output)
        assert list(work.iterdir()) == [], override
    assert not payload.marker.exists()


def test_checkpoint_config_naming_an_import_path_is_refused(payload: Payload, tmp_path: Path) -> None:
    """A checkpoint's saved config goes through the same registries (the predict loader)."""
    from viseg.inference.ensemble import load_ensemble

    for key, value in (("lr_scheduler.type", payload.path("run")), ("model.model_cls", payload.path("Popen")),
                       ("dataset.pathfinder", payload.path("Finder"))):
        saved = OmegaConf.structured(compose_typed("anatomy_config", []))
        OmegaConf.update(saved, key, value)
        checkpoint = {"state_dict": {}, "viseg": {"config_yaml": OmegaConf.to_yaml(saved), "plans": {}}}
        run_dir = fake_run_dir(tmp_path / key, checkpoint)
        with pytest.raises(ConfigError, match="does not validate"):
            load_ensemble([run_dir], "best", "cpu")
    assert_never_imported(payload)


def test_checkpoint_plan_naming_an_import_path_is_refused(payload: Payload, tmp_path: Path) -> None:
    """The plan inside a checkpoint names the architecture the network is built from: a registry key too."""
    from viseg.inference.ensemble import load_ensemble
    from viseg.planning.fingerprint import Fingerprint
    from viseg.planning.planner import PlannerSettings, make_plans

    fingerprint = Fingerprint(
        dataset_name="x", dataset_signature="x", channel_names=["MRI"], labels={"background": 0, "organ": 1},
        case_ids=["a", "b"], spacings=[[2.0, 1.0, 1.0]] * 2, shapes_before_crop=[[16, 32, 32]] * 2,
        shapes_after_crop=[[16, 32, 32]] * 2, median_relative_size_after_cropping=1.0,
        foreground_intensity_properties_per_channel={"0": {"mean": 0.0}}, class_voxel_counts={})
    plans = make_plans(fingerprint, PlannerSettings()).to_dict()
    plans["configurations"]["3d_fullres"]["network"]["architecture"] = payload.path("Popen")
    config = OmegaConf.to_yaml(OmegaConf.structured(compose_typed("anatomy_config", [])))
    run_dir = fake_run_dir(tmp_path / "run", {"state_dict": {}, "viseg": {"config_yaml": config, "plans": plans}})
    with pytest.raises(ConfigError, match="unknown architecture"):
        load_ensemble([run_dir], "best", "cpu")
    assert_never_imported(payload)


# -- (b) a static look at viseg's own source --------------------------------------------------------------------
# Calls that run or import code named by data; none belongs in viseg.
FORBIDDEN = {"eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "pickle.Unpickler",
             "dill.load", "dill.loads", "marshal.load", "marshal.loads", "shelve.open", "os.system", "os.popen",
             "yaml.unsafe_load", "yaml.full_load", "runpy.run_path", "runpy.run_module", "pydoc.locate",
             "hydra.utils.instantiate", "hydra.utils.call", "hydra.utils.get_class", "hydra.utils.get_method",
             "subprocess.getoutput", "subprocess.getstatusoutput"}
SUBPROCESS = {"subprocess.run", "subprocess.call", "subprocess.check_call", "subprocess.check_output",
              "subprocess.Popen"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin for every import in the file (`np` -> numpy, `load` -> torch.load)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _violation(call: ast.Call, name: str, aliases: dict[str, str]) -> str | None:
    if name in FORBIDDEN and not (name == "__import__" and call.args and isinstance(call.args[0], ast.Constant)):
        return f"{name}()"
    if name == "torch.load" and not _is_true(_keyword(call, "weights_only")):
        return "torch.load() without weights_only=True"
    if name == "importlib.import_module" and not (call.args and isinstance(call.args[0], ast.Constant)):
        return "importlib.import_module() of a computed name"
    if name == "yaml.load":
        loader = _keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
        if loader is None or _dotted(loader, aliases) not in SAFE_YAML_LOADERS:
            return "yaml.load() without SafeLoader"
    if name in SUBPROCESS and _keyword(call, "shell") is not None and not (
            isinstance(_keyword(call, "shell"), ast.Constant) and _keyword(call, "shell").value is False):
        return f"{name}(shell=...)"
    if name == "numpy.load" and _is_true(_keyword(call, "allow_pickle")):
        return "numpy.load(allow_pickle=True)"
    return None


def unsafe_calls(source: str, filename: str = "<snippet>") -> list[str]:
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            problem = _violation(node, name, aliases) if name else None
            if problem:
                found.append(f"{filename}:{node.lineno}: {problem}")
    return found


def test_viseg_source_has_no_unsafe_calls() -> None:
    files = sorted(VISEG.rglob("*.py"))
    assert len(files) > 30  # the whole package, not an empty glob
    found = [hit for path in files for hit in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []


@pytest.mark.parametrize("snippet", [
    "eval('1')", "exec('x = 1')", "import pickle\npickle.load(f)", "import pickle as p\np.loads(b)",
    "from pickle import loads\nloads(b)", "import torch\ntorch.load(p)",
    "import torch\ntorch.load(p, weights_only=False)",
    "from torch import load\nload(p, map_location='cpu')", "import importlib\nimportlib.import_module(name)",
    "__import__(name)", "import yaml\nyaml.load(f)", "import yaml\nyaml.load(f, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(f)", "import subprocess\nsubprocess.run(cmd, shell=True)",
    "import subprocess as sp\nsp.Popen(cmd, shell=flag)", "import os\nos.system('ls')",
    "import numpy as np\nnp.load(p, allow_pickle=True)", "from hydra.utils import instantiate\ninstantiate(cfg)",
])
def test_the_static_check_catches_each_unsafe_call(snippet: str) -> None:
    assert len(unsafe_calls(snippet)) == 1, snippet


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "import importlib\nimportlib.import_module('json')",
    "import yaml\nyaml.load(f, Loader=yaml.SafeLoader)", "import yaml\nyaml.safe_load(f)",
    "import subprocess\nsubprocess.run(['ls'], check=True)", "network.eval()", "import re\nre.compile('x')",
    "import numpy as np\nnp.load(p)", "import pickle\nraise pickle.UnpicklingError('x')",
])
def test_the_static_check_passes_safe_calls(snippet: str) -> None:
    assert unsafe_calls(snippet) == []


# -- (c) paths that leave the dataset folder -------------------------------------------------------------------
def test_decathlon_paths_escaping_the_dataset_are_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "Task01_Tiny", tmp_path / "outside"
    for folder in (root / "imagesTr", root / "labelsTr", outside):
        folder.mkdir(parents=True)
    image = np.random.default_rng(0).normal(100, 10, valid_label().shape).astype(np.float32)
    for case in ("c0", "c1"):
        write_nifti(image, root / "imagesTr" / f"{case}.nii.gz")
        write_nifti(valid_label(), root / "labelsTr" / f"{case}.nii.gz")
    write_nifti(image, outside / "stolen.nii.gz")  # a valid image: only the path rule keeps it out
    escapes = ["../../../../../../etc/passwd", "/etc/passwd", "./imagesTr/../../outside/stolen.nii.gz"]
    training = [{"image": path, "label": "./labelsTr/c0.nii.gz"} for path in escapes]
    training += [{"image": "./imagesTr/c1.nii.gz", "label": "../outside/stolen.nii.gz"},
                 {"image": "./imagesTr/c0.nii.gz", "label": "./labelsTr/c0.nii.gz"}]
    (root / "dataset.json").write_text(json.dumps({
        "name": "Escape", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "organ", "2": "vessel"},
        "numTraining": 2, "training": training}))

    result = run_viseg("verify", f"dataset.basepath={root}", "dataset.pathfinder=decathlon", "num_processes=1",
                       cwd=tmp_path)

    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    report = result.stdout
    assert report.count("ERROR   path-escape") == 4, report
    for path in [*escapes, "../outside/stolen.nii.gz"]:
        assert f"{path!r} points outside the dataset folder" in report
    assert report.count("fix: keep every file inside the dataset folder") == 4
    assert report.startswith("Dataset Escape: 2 cases, 4 errors")  # c1's image and c0 are still checked


@pytest.mark.parametrize("name", ["../../escape", "/etc/cron.d/x", "..", "a/../../b", "名前 with spaces"])
def test_dataset_name_cannot_move_the_cache_folder(tmp_path: Path, name: str) -> None:
    """dataset.json's name becomes the cache folder's name: it must stay one safe folder inside the cache."""
    info = DatasetInfo(name=name, root=tmp_path, channel_names=("MRI",), labels={"background": 0},
                       num_training=1, file_ending=".nii.gz", dataset_json=tmp_path / "dataset.json")
    cache = tmp_path / "cache"
    folder = dataset_cache_dir(cache, info)
    assert folder.parent == cache and folder.name not in ("", ".", "..") and "/" not in folder.name


# -- (d) checkpoints that would run code on load -----------------------------------------------------------------
class OpensAFileOnLoad:
    """Unpickling calls open(path, "w"): if any loader runs pickled code, the file appears."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def crafted_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A checkpoint shaped like viseg's, with the payload among its entries (torch's zip format or a plain
    pickle, which torch.load also reads)."""
    content = {"state_dict": {"network.w": torch.zeros(1)}, "viseg": {"config_yaml": "", "plans": {}},
               "callbacks": {"payload": OpensAFileOnLoad(marker)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:
        with open(path, "wb") as handle:
            pickle.dump(content, handle, protocol=2)  # torch.save's own protocol
    else:
        torch.save(content, path)
    return path


def fake_run_dir(run_dir: Path, checkpoint: dict | None = None) -> Path:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: x\n")
    if checkpoint is not None:
        torch.save(checkpoint, run_dir / "checkpoints" / "best.ckpt")
    return run_dir


def test_the_crafted_checkpoint_is_live(tmp_path: Path) -> None:
    """The control: an unrestricted load does run the payload, so the refusals below are real."""
    marker = tmp_path / "ran.marker"
    loaded = torch.load(crafted_checkpoint(tmp_path / "x.ckpt", marker), weights_only=False)
    loaded["callbacks"]["payload"].close()
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_predict_loader_refuses_code_in_a_checkpoint(tmp_path: Path, legacy: bool) -> None:
    from viseg.inference.ensemble import load_ensemble

    marker = tmp_path / "ran.marker"
    run_dir = fake_run_dir(tmp_path / "run" / "fold_0")
    crafted_checkpoint(run_dir / "checkpoints" / "best.ckpt", marker, legacy)
    with pytest.raises(ConfigError, match="cannot load") as error:
        load_ensemble([run_dir], "best", "cpu")
    assert error.value.fix and str(run_dir / "checkpoints" / "best.ckpt") in error.value.message
    assert not marker.exists()


def test_predict_command_refuses_code_in_a_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "ran.marker"
    run_dir = fake_run_dir(tmp_path / "run" / "fold_0")
    crafted_checkpoint(run_dir / "checkpoints" / "best.ckpt", marker)
    result = run_viseg("predict", f"model={run_dir}", f"input={tmp_path}", f"output={tmp_path / 'out'}",
                       "device=cpu", "checkpoint=best", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output and "fix:" in output, output
    assert "best.ckpt" in output
    assert not marker.exists() and not (tmp_path / "out").exists()


@dataclass
class ResolvedRun:
    run_dir: Path
    cfg: BaseConfig  # fully resolved, as the run folder's config.yaml holds it
    prepared: PreparedDataset


def resolved_run(tmp_path: Path, dataset: TinyDataset) -> ResolvedRun:
    """A run folder as python -m viseg.train leaves it (plan, splits, fully resolved config), without the
    training: planning the tiny dataset in-process is enough for continue_from to accept it."""
    from viseg.preprocessing.prepare import prepare
    from viseg.training.resolve import resolve_config
    from viseg.training.train import config_yaml, run_dir_for

    cfg = compose_typed("anatomy_config", [
        f"dataset.basepath={dataset.root}", f"paths.cache={tmp_path / 'cache'}",
        f"paths.results={tmp_path / 'results'}", "splits.n_folds=3", "num_processes=1", "loader.num_workers=0",
        "trainer.max_epochs=1", "trainer.iterations_per_epoch=1", "trainer.val_iterations=1"])
    prepared = prepare(cfg, progress=False)
    resolved = resolve_config(cfg, prepared.plans, prepared.configuration)
    run_dir = run_dir_for(resolved, prepared)
    run_dir.mkdir(parents=True)
    for name in ("plans.json", "splits.json", "dataset.json"):
        shutil.copyfile(prepared.plans_dir / name, run_dir / name)
    (run_dir / "config.yaml").write_text(config_yaml(resolved))
    return ResolvedRun(run_dir, resolved, prepared)


def test_resuming_refuses_code_in_a_checkpoint(tmp_path: Path) -> None:
    """Both ways a run resumes: `python -m viseg.train continue_from=...`, which picks a checkpoint that
    loads with weights_only=True first, and train(resume_from=...), which every resume ends in (a sweep
    trial also with the copy Ray kept), where Lightning loads it with weights_only=True."""
    from viseg.training.train import train

    marker = tmp_path / "ran.marker"
    run = resolved_run(tmp_path, make_tiny_dataset(tmp_path / "Dataset001_Tiny", channels=("MRI",)))
    checkpoint = crafted_checkpoint(run.run_dir / "checkpoints" / "last.ckpt", marker)

    result = run_viseg("train", f"continue_from={run.run_dir}", cwd=tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and str(checkpoint) in output and "fix:" in output, output
    assert not marker.exists()
    with pytest.raises(ConfigError, match="refusing to resume") as error:
        train(run.cfg, prepared=run.prepared, resume_from=checkpoint, run_dir=run.run_dir, progress=False)
    assert str(checkpoint) in error.value.message and error.value.fix
    assert not marker.exists()
    assert sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()) == ["last.ckpt"]  # nothing new saved
    assert not (run.run_dir / "finished.json").exists()
