"""Where every benchmark's results go: one JSON file, announced on stderr (the table goes to stdout)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def write_json(path: Path, result) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}", file=sys.stderr)
