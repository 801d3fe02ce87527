"""From a config to a verified, fingerprinted and planned dataset, cached on disk.

Cache layout (all under `paths.cache`):

    <DatasetName>-<path hash>/
        verification.json      passed verification of this exact dataset state
        fingerprint.json       reused while the dataset signature is unchanged
        plans/<architecture>-<configuration>-<settings hash>/
            plans.json         the contract read by preprocessing, training and inference
            splits.json        cross-validation folds (nnU-Net-compatible)
            dataset.json       copy of the raw dataset.json

Nothing is written for a dataset that fails verification.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from viseg.config import BaseConfig
from viseg.data.dataset import Case, DatasetInfo, Discovery
from viseg.data.demo import ensure_demo_dataset
from viseg.data.pathfinders import get_pathfinder
from viseg.data.splits import Split, load_user_splits, make_splits, save_splits
from viseg.data.verify import VerificationReport, verify_dataset
from viseg.errors import ConfigError, DatasetError
from viseg.io.atomic import copy_atomically
from viseg.io.jsonio import read_json, write_json_atomic
from viseg.planning.fingerprint import Fingerprint, extract_fingerprint
from viseg.planning.planner import CONFIGURATION_BY_DIM, PlannerSettings, inverse_permutation, make_plans
from viseg.planning.plans import Plans
from viseg.planning.transfer import load_plan_source, transfer_plans

log = logging.getLogger(__name__)


@dataclass
class PreparedDataset:
    info: DatasetInfo
    cases: list[Case]
    fingerprint: Fingerprint
    fingerprint_reused: bool
    plans: Plans
    plans_dir: Path
    splits: list[Split]
    configuration: str
    cache_dir: Path  # the dataset's cache folder (fingerprint, plans, preprocessed arrays)

    @property
    def plans_path(self) -> Path:
        return self.plans_dir / "plans.json"


def dataset_root(cfg: BaseConfig, progress: bool = True) -> Path:
    """The configured dataset folder, or the built-in demo dataset (generated on first use)."""
    if cfg.dataset.basepath:
        return Path(cfg.dataset.basepath).expanduser()

    return ensure_demo_dataset(Path(cfg.paths.cache), progress=progress)


def discover(cfg: BaseConfig, progress: bool = True) -> Discovery:
    finder = get_pathfinder(cfg.dataset.pathfinder, dataset_root(cfg, progress), cfg.dataset.img_foldername,
                            cfg.dataset.seg_foldername)
    return finder.discover()


def dataset_signature(info: DatasetInfo, cases: list[Case]) -> str:
    """Changes whenever dataset.json or any case file is added, removed, resized or touched."""
    digest = hashlib.sha256(info.dataset_json.read_bytes())
    for case in cases:
        for path in case.files():
            stat = path.stat()
            digest.update(f"{case.case_id}|{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def dataset_cache_dir(cache_root: Path, info: DatasetInfo) -> Path:
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", info.name).strip("_") or "dataset"
    path_hash = hashlib.sha256(str(info.root.resolve()).encode()).hexdigest()[:8]
    return Path(cache_root) / f"{safe_name}-{path_hash}"


def verify_or_raise(discovery: Discovery, cache_dir: Path, signature: str, num_processes: int | None,
                    progress: bool = True) -> None:
    """Verify once per dataset state; a failing dataset raises with the full report and writes nothing."""

    marker = cache_dir / "verification.json"
    if marker.is_file() and read_json(marker).get("dataset_signature") == signature:
        log.info("dataset unchanged since it last passed verification (%s)", marker)
        return
    report = verify_dataset(discovery, num_processes=num_processes, progress=progress)
    if not report.ok:
        raise DatasetError(report.render(), fix="fix the problems above, then run again")
    if report.warnings:
        log.warning(report.render())
    write_json_atomic(marker, {"dataset_signature": signature, "report": report.to_dict()})


def load_or_extract_fingerprint(info: DatasetInfo, cases: list[Case], cache_dir: Path, signature: str,
                                num_processes: int | None, progress: bool = True) -> tuple[Fingerprint, bool]:
    path = cache_dir / "fingerprint.json"
    if path.is_file():
        try:
            cached = Fingerprint.load(path)
            if cached.dataset_signature == signature:
                return cached, True
        except (TypeError, KeyError, ValueError, json.JSONDecodeError):
            log.warning("ignoring unreadable cached fingerprint %s; recomputing", path)
    fingerprint = extract_fingerprint(info, cases, num_processes=num_processes, progress=progress,
                                      signature=signature)
    fingerprint.save(path)
    return fingerprint, False


def configuration_name(cfg: BaseConfig) -> str:
    """The planned configuration `cfg` trains: its `configuration=`, else the model's (2d for a 2D network,
    3d_fullres for a 3D one, as before the key existed, so older run configs name the same one)."""
    return cfg.configuration or CONFIGURATION_BY_DIM[cfg.model.model_args.conv_dim]


def planner_settings(cfg: BaseConfig) -> PlannerSettings:
    forward = cfg.transpose_forward
    if forward is None and cfg.transpose_backward is not None:
        forward = list(inverse_permutation(cfg.transpose_backward))

    def tup(value: list | None) -> tuple | None:
        return tuple(value) if value is not None else None

    return PlannerSettings(
        architecture=cfg.model.model_cls,
        gpu_memory_gb=float(cfg.plan.gpu_memory_gb),
        base_num_features=cfg.plan.base_num_features,
        configuration=configuration_name(cfg),
        foreground_labels=tup(cfg.foreground_labels),
        patch_size=tup(cfg.patch_size),
        spacing=tup(cfg.spacing),
        batch_size=cfg.batch_size,
        transpose_forward=tup(forward),
    )


# Settings added after plan folders were first named: they enter the folder's hash only when set, so that
# existing caches and run folders keep their names.
_LATER_SETTINGS = ("base_num_features", "source_plan")


def plans_dir_for(cache_dir: Path, settings: PlannerSettings) -> Path:
    values = {k: v for k, v in asdict(settings).items() if not (k in _LATER_SETTINGS and v is None)}
    key = json.dumps(values, sort_keys=True, default=list)
    return cache_dir / "plans" / (
        f"{settings.architecture}-{settings.configuration}-{hashlib.sha256(key.encode()).hexdigest()[:8]}")


def _splits(cfg: BaseConfig, info: DatasetInfo, case_ids: list[str]) -> list[Split]:
    shipped = info.root / "splits_final.json"
    if shipped.is_file() and not cfg.splits.group_pattern:
        return load_user_splits(shipped, case_ids)
    return make_splits(case_ids, cfg.splits.n_folds, cfg.splits.seed, cfg.splits.group_pattern)


def current_splits(cfg: BaseConfig, prepared: PreparedDataset) -> list[Split]:
    """The folds the dataset gives now (its splits_final.json, else generated): what a new run would get, to
    compare with a started run's own splits.json."""
    return _splits(cfg, prepared.info, [c.case_id for c in prepared.cases])


def _write_once(plans_dir: Path, plans: Plans, splits: list[Split], info: DatasetInfo) -> None:
    """plans.json is a contract: rewrite it only if its content would change (it never should for the
    same fingerprint and settings), so runs reading it are never disturbed."""
    path = plans_dir / "plans.json"
    try:
        unchanged = path.is_file() and Plans.load(path) == plans
    except (KeyError, TypeError, ValueError):
        unchanged = False
    if not unchanged:
        plans.save(path)
    save_splits(plans_dir / "splits.json", splits)
    _copy_if_changed(info.dataset_json, plans_dir / "dataset.json")


def _copy_if_changed(source: Path, target: Path) -> None:
    """A copy every prepare would otherwise rewrite in place, under runs and predictions reading it: it is
    replaced (atomically) only when the source's bytes differ."""
    content = source.read_bytes()
    try:
        if target.read_bytes() == content:
            return
    except OSError:
        pass
    copy_atomically(source, target)


@dataclass
class _VerifiedDataset:
    info: DatasetInfo
    cases: list[Case]
    cache_dir: Path
    fingerprint: Fingerprint
    fingerprint_reused: bool


def _verified(cfg: BaseConfig, progress: bool) -> _VerifiedDataset:
    """Discover, verify (once per dataset state) and fingerprint (cached): what planning and continuing a
    run both need. Discovery problems stop here with the full report, before anything is written."""
    discovery = discover(cfg, progress)
    if discovery.info is None or any(p.severity == "error" for p in discovery.problems):

        name = discovery.info.name if discovery.info else str(dataset_root(cfg, progress))
        report = VerificationReport(dataset=name, n_cases=len(discovery.cases), problems=discovery.problems)
        raise DatasetError(report.render(), fix="fix the problems above, then run again")
    info, cases = discovery.info, discovery.cases
    cache_dir = dataset_cache_dir(Path(cfg.paths.cache), info)
    signature = dataset_signature(info, cases)
    verify_or_raise(discovery, cache_dir, signature, cfg.num_processes, progress)
    fingerprint, reused = load_or_extract_fingerprint(info, cases, cache_dir, signature, cfg.num_processes,
                                                      progress)
    return _VerifiedDataset(info, cases, cache_dir, fingerprint, reused)


def prepare(cfg: BaseConfig, progress: bool = True) -> PreparedDataset:
    """Verify, fingerprint and plan (each only when its inputs changed) and write the plan folder."""
    data = _verified(cfg, progress)
    settings = planner_settings(cfg)
    if cfg.plan.from_model:
        plans, settings = _transferred_plans(cfg, settings, data.fingerprint)
    else:
        plans = make_plans(data.fingerprint, settings)
    plans_dir = plans_dir_for(data.cache_dir, settings)
    splits = _splits(cfg, data.info, [c.case_id for c in data.cases])
    _write_once(plans_dir, plans, splits, data.info)
    return PreparedDataset(info=data.info, cases=data.cases, fingerprint=data.fingerprint,
                           fingerprint_reused=data.fingerprint_reused, plans=plans, plans_dir=plans_dir,
                           splits=splits, configuration=settings.configuration, cache_dir=data.cache_dir)


def _transferred_plans(cfg: BaseConfig, settings: PlannerSettings, fingerprint: Fingerprint
                       ) -> tuple[Plans, PlannerSettings]:
    """plan.from=: the source's plan for this dataset, and the settings that name its folder (the source's
    digest instead of topology values, which the source decides)."""
    source = load_plan_source(str(cfg.plan.from_model), settings.configuration)
    plan = source.plans.configuration(source.configuration)
    given = {"patch_size": (settings.patch_size, plan.patch_size), "spacing": (settings.spacing, plan.spacing),
             "transpose_forward": (settings.transpose_forward, source.plans.transpose_forward),
             "plan.base_num_features": (settings.base_num_features, None)}
    # a run's own resolved config repeats the source's values: only a different one would plan another network
    clashing = [key for key, (ours, theirs) in given.items()
                if ours is not None and (theirs is None or [float(v) for v in ours] != [float(v) for v in theirs])]
    if clashing:
        raise ConfigError(f"plan.from={cfg.plan.from_model} takes {', '.join(clashing)} from the source's plan, "
                          "so the source's weights fit; this config sets another value",
                          fix=f"drop {', '.join(f'{k}=' for k in clashing)} (batch_size= and foreground_labels= "
                              "may still be set)")
    plans = transfer_plans(source, fingerprint, settings.configuration, settings.architecture,
                           settings.foreground_labels, settings.batch_size)
    log.info("plan transferred from %s (%s plan, %s)", source.path, source.kind, source.configuration)
    return plans, replace(settings, patch_size=None, spacing=None, transpose_forward=None, source_plan=source.digest)


def prepared_from_run(cfg: BaseConfig, run_dir: Path, progress: bool = True) -> PreparedDataset:
    """A run folder's own plan and splits with the dataset it was trained on: continuing a run never
    re-plans (a re-plan from the resolved config could differ)."""
    data = _verified(cfg, progress)
    return PreparedDataset(info=data.info, cases=data.cases, fingerprint=data.fingerprint,
                           fingerprint_reused=data.fingerprint_reused, plans=Plans.load(run_dir / "plans.json"),
                           plans_dir=run_dir, splits=read_json(run_dir / "splits.json"),
                           configuration=configuration_name(cfg),
                           cache_dir=data.cache_dir)
