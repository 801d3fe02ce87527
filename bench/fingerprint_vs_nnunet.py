"""Fingerprint extraction, nnU-Net v2 vs viseg: wall-clock time on the same cores, and whether they agree.

Measured: the wall-clock time of one complete fingerprint extraction of a raw nnU-Net-layout dataset,
including interpreter start-up and imports, because that is what a user waits for. Both tools run as fresh
subprocesses with the same number of worker processes:

* nnU-Net: ``nnUNetv2_extract_fingerprint -d ID -np N --clean --no_pbar`` from ``bench/.venv-nnunet``
  (made by ``bench/setup_nnunet_env.sh``), on a temporary ``nnUNet_raw`` whose ``DatasetXXX_Name`` entry is a
  symlink to the dataset (nnU-Net only finds datasets by that naming);
* viseg: ``python -c`` calling ``get_pathfinder("nnunet", root).discover()`` and ``extract_fingerprint``.

The tools alternate (nnU-Net, viseg, nnU-Net, viseg, ...) so that background load drifting over time hits
both alike, and the medians are compared. Before the first round every dataset file is read once so that
neither tool pays for a cold page cache.

Reading the ratio: ``median(viseg) / median(nnU-Net)``; below 1 viseg is faster (0.5: twice as fast),
above 1 it is slower.

Agreement: spacings and shapes_after_crop per case (nnU-Net stores them as bare lists in its own case order,
which is asked from nnU-Net itself), foreground intensity statistics (relative 1e-3), and
median_relative_size_after_cropping.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
NNUNET_VENV = BENCH_DIR / ".venv-nnunet"
DEFAULT_DATASET = Path("/work/shared/data/acdc")
DEFAULT_OUT = BENCH_DIR / "results" / "fingerprint_acdc.json"
INTENSITY_RTOL = 1e-3
# NIfTI stores spacing as float32; two readers may widen it to float64 differently.
SPACING_RTOL = 1e-6
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# The viseg side, run as `python -c VISEG_SNIPPET root num_processes out_json` so that it pays the same
# start-up and import cost as nnU-Net's CLI.
VISEG_SNIPPET = """
import json, sys
from pathlib import Path
from viseg.data.pathfinders import get_pathfinder
from viseg.planning.fingerprint import extract_fingerprint

root, num_processes, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
discovery = get_pathfinder("nnunet", root).discover()
errors = [p for p in discovery.problems if p.severity == "error"]
if discovery.info is None or errors:
    sys.exit("viseg discovery failed:\\n" + "\\n".join(str(p) for p in discovery.problems))
fp = extract_fingerprint(discovery.info, discovery.cases, num_processes=num_processes, progress=False)
out.write_text(json.dumps(fp.to_dict()))
"""

# Asks nnU-Net for its case order: its fingerprint lists are in this order but do not name the cases.
NNUNET_ORDER_SNIPPET = """
import json, sys
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
print(json.dumps(list(get_filenames_of_train_images_and_targets(sys.argv[1]).keys())))
"""

VERSIONS_SNIPPET = """
import importlib.metadata as m, json, sys
out = {"python": sys.version.split()[0]}
for name in sys.argv[1:]:
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""


@dataclass
class Check:
    """One row of the agreement table."""

    field: str
    ok: bool
    detail: str


# -- command line ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Needs bench/.venv-nnunet: run `bash bench/setup_nnunet_env.sh` first, or use "
        "`bash bench/fingerprint_vs_nnunet.sh`, which does.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        type=Path,
        default=DEFAULT_DATASET,
        help="raw dataset in nnU-Net v2 layout (dataset.json, imagesTr/, labelsTr/); default: %(default)s",
    )
    parser.add_argument(
        "--np",
        type=int,
        default=2,
        dest="num_processes",
        help="worker processes for both tools (default: %(default)s, this machine's cores)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="alternating rounds, each one nnU-Net run then one viseg run (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="results JSON; a markdown summary is written beside it with suffix .md, raw "
        "fingerprints and logs under raw/ beside it (default: %(default)s)",
    )
    parser.add_argument(
        "--nnunet-id",
        type=int,
        default=27,
        help="dataset ID nnU-Net is given (the temp folder is DatasetXXX_Name; default: %(default)s)",
    )
    parser.add_argument(
        "--viseg-python",
        type=Path,
        default=REPO / ".venv" / "bin" / "python",
        help="python of viseg's venv that runs the viseg side (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.num_processes < 1:
        parser.error("--repeats and --np must be at least 1")
    return args


# -- environment ----------------------------------------------------------------------------------------


def package_versions(python: Path, packages: list[str]) -> dict[str, str | None]:
    """Installed versions as seen by `python`: the two tools live in different venvs."""
    out = subprocess.run(
        [str(python), "-c", VERSIONS_SNIPPET, *packages], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def machine_info(viseg_python: Path) -> dict[str, Any]:
    """What the timings depend on, so that results from different machines are not mixed up."""
    nnunet = package_versions(NNUNET_VENV / "bin" / "python", ["nnunetv2", "torch", "numpy", "SimpleITK"])
    viseg = package_versions(viseg_python, ["viseg", "torch", "numpy", "nibabel"])
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "nnunet_env": nnunet,
        "viseg_env": viseg,
        "thread_env": {k: v for k, v in os.environ.items() if k in THREAD_VARS},
    }


def warm_page_cache(dataset: Path) -> int:
    """Read every file once so that round 1's first tool does not pay for a cold disk alone."""
    total = 0
    for path in sorted(dataset.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                while chunk := f.read(1 << 22):
                    total += len(chunk)
    return total


def make_nnunet_raw(tmp: Path, dataset: Path, dataset_id: int) -> tuple[Path, str]:
    """A temp nnUNet_raw holding DatasetXXX_Name -> the dataset: nnU-Net finds datasets only by that name."""
    raw = tmp / "nnUNet_raw"
    raw.mkdir()
    name = "".join(ch if ch.isalnum() else "_" for ch in dataset.resolve().name).upper() or "DATA"
    folder = f"Dataset{dataset_id:03d}_{name}"
    (raw / folder).symlink_to(dataset.resolve(), target_is_directory=True)
    return raw, folder


def nnunet_case_order(raw_dataset_folder: Path) -> list[str]:
    """nnU-Net's own case order, the order of the per-case lists in its fingerprint."""
    out = subprocess.run(
        [str(NNUNET_VENV / "bin" / "python"), "-c", NNUNET_ORDER_SNIPPET, str(raw_dataset_folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


# -- the timed runs -------------------------------------------------------------------------------------


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Wall-clock seconds of `cmd`, process start included; output goes to `log`, shown on failure."""
    with log.open("w") as f:
        start = time.perf_counter()
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{cmd[0]} exited with {rc}; last lines of {log}:\n{tail}")
    return seconds


def run_nnunet(
    tmp: Path, raw: Path, folder: str, dataset_id: int, num_processes: int, round_no: int, logs: Path
) -> tuple[float, dict[str, Any]]:
    """One nnU-Net fingerprint extraction into a fresh nnUNet_preprocessed (so nothing can be reused)."""
    run_dir = tmp / f"nnunet_round{round_no}"
    env = dict(
        os.environ,
        nnUNet_raw=str(raw),
        nnUNet_preprocessed=str(run_dir / "preprocessed"),
        nnUNet_results=str(run_dir / "results"),
    )
    cmd = [
        str(NNUNET_VENV / "bin" / "nnUNetv2_extract_fingerprint"),
        "-d",
        str(dataset_id),
        "-np",
        str(num_processes),
        "--clean",
        "--no_pbar",
    ]
    seconds = timed(cmd, env, logs / f"nnunet_round{round_no}.log")
    fingerprint = json.loads((run_dir / "preprocessed" / folder / "dataset_fingerprint.json").read_text())
    return seconds, fingerprint


def run_viseg(
    tmp: Path, viseg_python: Path, dataset: Path, num_processes: int, round_no: int, logs: Path
) -> tuple[float, dict[str, Any]]:
    """One viseg fingerprint extraction in a fresh process (same start-up cost as nnU-Net's CLI)."""
    out = tmp / f"viseg_round{round_no}.json"
    cmd = [str(viseg_python), "-c", VISEG_SNIPPET, str(dataset), str(num_processes), str(out)]
    seconds = timed(cmd, dict(os.environ), logs / f"viseg_round{round_no}.log")
    return seconds, json.loads(out.read_text())


# -- agreement ------------------------------------------------------------------------------------------


def rel_diff(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude; 0 when both are NaN (both found no foreground)."""
    if math.isnan(a) and math.isnan(b):
        return 0.0
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def per_case_pairs(
    nnunet: dict[str, Any], viseg: dict[str, Any], order: list[str], key: str
) -> list[tuple[str, Any, Any]] | None:
    """(case, nnU-Net value, viseg value) for per-case list `key`, viseg reordered into nnU-Net's case
    order; None when the two do not cover the same cases."""
    by_case = dict(zip(viseg["case_ids"], viseg[key], strict=True))
    if set(by_case) != set(order) or len(nnunet[key]) != len(order):
        return None
    return [(c, ref, by_case[c]) for c, ref in zip(order, nnunet[key], strict=True)]


def check_cases(nnunet: dict[str, Any], viseg: dict[str, Any], order: list[str]) -> Check:
    ok = len(order) == len(nnunet["spacings"]) and sorted(order) == sorted(viseg["case_ids"])
    return Check(
        "cases",
        ok,
        f"nnU-Net {len(nnunet['spacings'])}, viseg {len(viseg['case_ids'])}"
        + ("" if ok else "; case lists differ"),
    )


def check_shapes(nnunet: dict[str, Any], viseg: dict[str, Any], order: list[str]) -> Check:
    pairs = per_case_pairs(nnunet, viseg, order, "shapes_after_crop")
    if pairs is None:
        return Check("shapes_after_crop", False, "case sets differ")
    bad = [c for c, a, b in pairs if list(a) != list(b)]
    detail = "all cases equal" if not bad else f"{len(bad)} cases differ, e.g. {bad[:3]}"
    return Check("shapes_after_crop", not bad, detail)


def check_spacings(nnunet: dict[str, Any], viseg: dict[str, Any], order: list[str]) -> Check:
    pairs = per_case_pairs(nnunet, viseg, order, "spacings")
    if pairs is None:
        return Check("spacings", False, "case sets differ")
    if all(list(map(float, a)) == list(map(float, b)) for _, a, b in pairs):
        return Check("spacings", True, "all cases exactly equal")
    bad = [c for c, a, b in pairs if len(a) != len(b)]
    diffs = {c: max(rel_diff(x, y) for x, y in zip(a, b, strict=True)) for c, a, b in pairs if c not in bad}
    bad += [c for c, d in diffs.items() if d > SPACING_RTOL]
    worst = max(diffs.values(), default=math.inf)
    detail = f"not bit-equal; max rel diff {worst:.2e} (tolerance {SPACING_RTOL:g})"
    return Check("spacings", not bad, detail + (f"; {len(bad)} cases differ, e.g. {bad[:3]}" if bad else ""))


def check_intensities(nnunet: dict[str, Any], viseg: dict[str, Any]) -> list[Check]:
    checks = []
    ref = nnunet["foreground_intensity_properties_per_channel"]
    got = viseg["foreground_intensity_properties_per_channel"]
    for channel in sorted(ref):
        for stat in sorted(ref[channel]):
            name = f"intensity[{channel}].{stat}"
            if stat not in got.get(channel, {}):
                checks.append(Check(name, False, "missing in viseg"))
                continue
            a, b = float(ref[channel][stat]), float(got[channel][stat])
            d = rel_diff(a, b)
            detail = f"nnU-Net {a:.6g}, viseg {b:.6g}, rel diff {d:.1e}"
            checks.append(Check(name, d <= INTENSITY_RTOL, detail))
    return checks


def check_median_relative_size(nnunet: dict[str, Any], viseg: dict[str, Any]) -> Check:
    key = "median_relative_size_after_cropping"
    a, b = float(nnunet[key]), float(viseg[key])
    return Check(key, a == b, f"nnU-Net {a!r}, viseg {b!r}" + ("" if a == b else f", diff {abs(a - b):.2e}"))


def compare(nnunet: dict[str, Any], viseg: dict[str, Any], order: list[str]) -> list[Check]:
    """Every agreement check, in table order."""
    return [
        check_cases(nnunet, viseg, order),
        check_spacings(nnunet, viseg, order),
        check_shapes(nnunet, viseg, order),
        *check_intensities(nnunet, viseg),
        check_median_relative_size(nnunet, viseg),
    ]


def stable(fingerprints: list[dict[str, Any]]) -> bool:
    """Whether every round produced the same fingerprint (both tools are meant to be deterministic)."""
    return all(fp == fingerprints[0] for fp in fingerprints[1:])


# -- reporting ------------------------------------------------------------------------------------------


def agreement_table(checks: list[Check]) -> str:
    width = max(len(c.field) for c in checks)
    rows = [f"{'field':<{width}}  ok    detail", f"{'-' * width}  ----  ------"]
    rows += [f"{c.field:<{width}}  {'yes' if c.ok else 'NO':<4}  {c.detail}" for c in checks]
    return "\n".join(rows)


def timing_table(rounds: list[dict[str, float]], medians: dict[str, float], ratio: float) -> str:
    rows = ["round  nnU-Net [s]  viseg [s]"]
    rows += [f"{r['round']:>5}  {r['nnunet_s']:>11.2f}  {r['viseg_s']:>9.2f}" for r in rounds]
    rows.append(f"{'median':>6} {medians['nnunet']:>11.2f}  {medians['viseg']:>9.2f}")
    rows.append(
        f"ratio median(viseg)/median(nnU-Net) = {ratio:.3f} "
        f"({'viseg faster' if ratio < 1 else 'viseg slower' if ratio > 1 else 'equal'})"
    )
    return "\n".join(rows)


def markdown(result: dict[str, Any], checks: list[Check]) -> str:
    """A short human summary; the JSON beside it has everything."""
    m, s = result["machine"], result["settings"]
    nn, vi = m["nnunet_env"], m["viseg_env"]
    lines = [
        f"# Fingerprint extraction: nnU-Net v2 vs viseg ({result['dataset']['name']})",
        "",
        f"{result['timestamp']}; {result['dataset']['num_cases']} cases from `{result['dataset']['path']}`; "
        f"`-np {s['num_processes']}` for both, {s['repeats']} alternating rounds, wall clock incl. "
        "process start.",
        f"Machine: {m['cpu_count']} CPUs, Python {m['python']}; nnunetv2 {nn['nnunetv2']} "
        f"(torch {nn['torch']}), viseg {vi['viseg']} (torch {vi['torch']}). "
        f"Load average (1/5/15 min) before {_load(result['load_before'])}, "
        f"after {_load(result['load_after'])}.",
        "",
        "| round | nnU-Net [s] | viseg [s] |",
        "| ---: | ---: | ---: |",
        *(f"| {r['round']} | {r['nnunet_s']:.2f} | {r['viseg_s']:.2f} |" for r in result["rounds"]),
        f"| **median** | **{result['median_s']['nnunet']:.2f}** | **{result['median_s']['viseg']:.2f}** |",
        "",
        f"**ratio median(viseg) / median(nnU-Net) = {result['ratio_viseg_over_nnunet']:.3f}** "
        "(< 1: viseg faster).",
        "",
        f"Fingerprints agree: **{'yes' if result['agreement']['all_agree'] else 'NO'}** "
        f"(stable across rounds: nnU-Net {result['agreement']['nnunet_stable_across_rounds']}, "
        f"viseg {result['agreement']['viseg_stable_across_rounds']}).",
        "",
        "| field | ok | detail |",
        "| --- | --- | --- |",
        *(f"| {c.field} | {'yes' if c.ok else '**NO**'} | {c.detail} |" for c in checks),
        "",
    ]
    return "\n".join(lines)


def _load(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def write_results(out: Path, result: dict[str, Any], checks: list[Check],
                  render: Callable[[dict[str, Any], list[Check]], str] | None = None) -> None:
    """The JSON and its Markdown report beside it; each bench passes its own `render` (default: this one's)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text((render or markdown)(result, checks))


# -- main -----------------------------------------------------------------------------------------------


def run_rounds(
    args: argparse.Namespace, tmp: Path, raw: Path, folder: str, logs: Path
) -> tuple[list[dict[str, float]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Alternate nnU-Net and viseg, so slow drifts in background load hit both."""
    rounds, nnunet_fps, viseg_fps = [], [], []
    for i in range(1, args.repeats + 1):
        t_nnunet, fp_nnunet = run_nnunet(tmp, raw, folder, args.nnunet_id, args.num_processes, i, logs)
        t_viseg, fp_viseg = run_viseg(tmp, args.viseg_python, args.dataset, args.num_processes, i, logs)
        print(f"round {i}/{args.repeats}: nnU-Net {t_nnunet:.2f} s, viseg {t_viseg:.2f} s", flush=True)
        rounds.append({"round": i, "nnunet_s": round(t_nnunet, 3), "viseg_s": round(t_viseg, 3)})
        nnunet_fps.append(fp_nnunet)
        viseg_fps.append(fp_viseg)
    return rounds, nnunet_fps, viseg_fps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dataset = args.dataset.resolve()
    if not (NNUNET_VENV / "bin" / "nnUNetv2_extract_fingerprint").exists():
        sys.exit("bench/.venv-nnunet is missing: run `bash bench/setup_nnunet_env.sh` first")
    dataset_json = json.loads((args.dataset / "dataset.json").read_text())
    raw_dir = args.out.parent / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)

    machine = machine_info(args.viseg_python)
    print(f"warming the page cache: {warm_page_cache(args.dataset) / 2**20:.0f} MiB read", flush=True)
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench_fingerprint_") as tmp_name:
        tmp = Path(tmp_name)
        raw, folder = make_nnunet_raw(tmp, args.dataset, args.nnunet_id)
        order = nnunet_case_order(raw / folder)
        rounds, nnunet_fps, viseg_fps = run_rounds(args, tmp, raw, folder, raw_dir)
    load_after = list(os.getloadavg())

    (raw_dir / "fingerprint_nnunet.json").write_text(json.dumps(nnunet_fps[-1], indent=1))
    (raw_dir / "fingerprint_viseg.json").write_text(json.dumps(viseg_fps[-1], indent=1))
    checks = compare(nnunet_fps[-1], viseg_fps[-1], order)
    medians = {
        "nnunet": statistics.median(r["nnunet_s"] for r in rounds),
        "viseg": statistics.median(r["viseg_s"] for r in rounds),
    }
    ratio = medians["viseg"] / medians["nnunet"]
    result = {
        "benchmark": "dataset fingerprint extraction: nnU-Net v2 CLI vs viseg extract_fingerprint",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {
            "path": str(args.dataset),
            "name": dataset_json.get("name", args.dataset.name),
            "num_cases": len(order),
            "nnunet_folder": folder,
        },
        "machine": machine,
        "settings": {
            "num_processes": args.num_processes,
            "repeats": args.repeats,
            "order": "per round: nnU-Net then viseg",
            "timing": "wall clock of a fresh subprocess",
            "page_cache": "warmed before round 1",
        },
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in load_after],
        "rounds": rounds,
        "median_s": {k: round(v, 3) for k, v in medians.items()},
        "ratio_viseg_over_nnunet": round(ratio, 4),
        "agreement": {
            "all_agree": all(c.ok for c in checks),
            "nnunet_stable_across_rounds": stable(nnunet_fps),
            "viseg_stable_across_rounds": stable(viseg_fps),
            "intensity_rtol": INTENSITY_RTOL,
            "spacing_rtol": SPACING_RTOL,
            "checks": [asdict(c) for c in checks],
        },
    }
    write_results(args.out, result, checks)

    print()
    print(timing_table(rounds, medians, ratio))
    print(f"load average before {_load(load_before)}, after {_load(load_after)}")
    print()
    print(agreement_table(checks))
    print(f"\nfingerprints agree: {'yes' if result['agreement']['all_agree'] else 'NO'}")
    print(f"results: {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
