"""JSON files written atomically: a killed process never leaves a half-written file that a later run
trusts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from viseg.io.atomic import write_text_atomically


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(data, indent=2) + "\n", fsync=True)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
