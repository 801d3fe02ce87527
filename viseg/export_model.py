"""`viseg export-model`: trained runs as one file to share (viseg/io/model_archive.py owns the format).

    viseg export-model <run folder | run,run,... | experiment folder> <model.zip> [variant=<name>]
        [checkpoint=final|best|last]

The archive holds each run's plan, dataset.json, resolved config and split, the chosen checkpoint and the
selection's postprocessing.json, with a manifest of sha256 sums. `viseg predict model=model.zip` and
`init_from=model.zip` use it as they would the run folders; a changed entry or one that would be unpacked
outside its folder is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

from viseg.cli import configure_logging, exit_status
from viseg.errors import ConfigError
from viseg.inference.ensemble import checkpoint_path, resolve_model
from viseg.io.layout import WEIGHTS, WEIGHTS_HELP
from viseg.io.model_archive import write_archive
from viseg.provenance import code_version


def export(source: str, target: Path, variant: str | None = None, checkpoint: str = "final") -> dict:
    if checkpoint not in WEIGHTS:
        raise ConfigError(f"checkpoint={checkpoint!r} is not a checkpoint name", fix=f"use {WEIGHTS_HELP}")
    if target.suffix != ".zip":
        raise ConfigError(f"{target} does not end in .zip", fix="name the archive <something>.zip")
    selection = resolve_model(source, variant)
    for run_dir in selection.run_dirs:
        checkpoint_path(run_dir, checkpoint)  # each run has the weights asked for (final: finished training)
    post = selection.postprocessing.source if selection.postprocessing else None
    return write_archive(list(selection.run_dirs), target, checkpoint, post, code_version().to_dict())


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(__doc__.strip())
        return 0
    options = dict(a.split("=", 1) for a in args if "=" in a and a.split("=", 1)[0] in ("variant", "checkpoint"))
    positional = [a for a in args if a.split("=", 1)[0] not in ("variant", "checkpoint")]
    if len(positional) != 2:
        print("viseg export-model: error: give the runs and the target: viseg export-model <runs> <model.zip> "
              "(viseg export-model --help)", file=sys.stderr)
        return 2
    configure_logging()
    return exit_status("export-model", lambda: _export_and_say(positional[0], Path(positional[1]), options))


def _export_and_say(source: str, target: Path, options: dict[str, str]) -> int:
    manifest = export(source, target, options.get("variant"), options.get("checkpoint", "final"))
    print(f"wrote {target}: {len(manifest['runs'])} run(s) ({', '.join(manifest['runs'])}), "
          f"{manifest['checkpoint']} weights" + (", with postprocessing" if manifest["postprocessing"] else ""))
    print(f"predict with: viseg predict model={target} input=<folder> output=<folder>")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
