"""`python -m viseg.plan`: verify, fingerprint and plan a dataset, then print the plan as a table."""

from __future__ import annotations

from viseg.cli import run_app
from viseg.config import BaseConfig, reject_derived_overrides
from viseg.planning.plans import ConfigurationPlan, Plans
from viseg.preprocessing.prepare import PreparedDataset, prepare


def _fmt(values: tuple) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _configuration_rows(plan: ConfigurationPlan) -> list[tuple[str, str]]:
    net = plan.network
    return [
        ("spacing (mm)", _fmt(plan.spacing)),
        ("median image size", _fmt(tuple(round(m, 1) for m in plan.median_image_size_in_voxels))),
        ("patch size", _fmt(plan.patch_size)),
        ("batch size", str(plan.batch_size)),
        ("normalization", ", ".join(plan.normalization_schemes)),
        ("architecture", net.architecture),
        ("stages", str(net.n_stages)),
        ("features per stage", " ".join(map(str, net.features_per_stage))),
        ("strides", " ".join(_fmt(s) for s in net.strides)),
        ("kernel sizes", " ".join(_fmt(k) for k in net.kernel_sizes)),
        ("convs per stage (enc/dec)", f"{' '.join(map(str, net.n_conv_per_stage))} / "
                                      f"{' '.join(map(str, net.n_conv_per_stage_decoder))}"),
        ("stage", f"after {plan.previous_stage}" if plan.previous_stage else
         f"before {plan.next_stage}" if plan.next_stage else "-"),
    ]


def render_plan(plans: Plans, selected: str) -> str:
    names = [n for n in ("3d_fullres", "3d_lowres", "3d_cascade_fullres", "2d") if n in plans.configurations]
    rows = {n: dict(_configuration_rows(plans.configurations[n])) for n in names}
    keys = list(rows[names[0]])
    titles = {n: n + (" *" if n == selected else "") for n in names}
    widths = {n: max(len(titles[n]), *(len(v) for v in rows[n].values())) + 3 for n in names}
    key_width = max(len(k) for k in keys) + 2
    lines = [" " * key_width + "".join(f"{titles[n]:<{widths[n]}}" for n in names)]
    lines += [f"{k:{key_width}}" + "".join(f"{rows[n][k]:<{widths[n]}}" for n in names) for k in keys]
    return "\n".join(line.rstrip() for line in lines)


def _planned_by(planner: dict) -> str:
    if "plan_from" in planner:  # planning.transfer: another model's plan
        return f"plan from          {planner['plan_from']} ({planner['plan_from_kind']}, {planner['architecture']})"
    return f"GPU memory target  {planner['gpu_memory_gb']:g} GB ({planner['architecture']})"


def summary(prepared: PreparedDataset) -> str:
    plans, fp = prepared.plans, prepared.fingerprint
    labels = ", ".join(f"{name}={value}" for name, value in plans.labels.items())
    return "\n".join([
        f"dataset            {plans.dataset_name} ({fp.num_cases} cases, {prepared.info.root})",
        f"channels           {', '.join(plans.channel_names)}",
        f"labels             {labels}; predicting {list(plans.foreground_labels)}",
        f"fingerprint        {'reused from cache' if prepared.fingerprint_reused else 'extracted'}",
        f"median spacing     {_fmt(plans.original_median_spacing_after_transp)} mm (after transpose)",
        f"median shape       {_fmt(plans.original_median_shape_after_transp)} (after crop and transpose)",
        _planned_by(plans.planner),
        f"transpose          forward {list(plans.transpose_forward)}, backward {list(plans.transpose_backward)}",
        "",
        render_plan(plans, prepared.configuration),
        "",
        f"(* = the configuration this config trains: {prepared.configuration})",
        f"plans              {prepared.plans_path}",
        f"splits             {prepared.plans_dir / 'splits.json'} "
        f"({len(prepared.splits)} folds, {[len(s['val']) for s in prepared.splits]} validation cases)",
    ])


def plan_command(cfg: BaseConfig) -> int:
    reject_derived_overrides(cfg)
    prepared = prepare(cfg)
    print(summary(prepared))
    return 0


def main(argv: list[str] | None = None) -> None:
    run_app(plan_command, app="plan", argv=argv)


if __name__ == "__main__":
    main()
