"""Names in a run folder that several modules read. Import-free on purpose: `--help`, the summary and the
predict loader use them without pulling in Lightning."""

FINISHED_MARKER = "finished.json"  # written by train() last, after the validation summary
