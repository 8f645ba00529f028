"""Shared by the benchmark scripts: write a results file so a crash never leaves half of one."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    """Write to a temporary file beside `path`, then os.replace it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(payload, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(handle.name, path)
