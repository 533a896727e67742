"""Local files written whole or not at all, and the JSON Lines a run directory keeps.

`write_atomic` is the one way raydiff writes a local file that must never be seen half-written
(configs, metrics summaries, samples, results, the prepared data's manifest and tokenizer via
`raydiff.data.storage.Location`); directories (checkpoints, prepared outputs) are staged and
renamed by their owners.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` through a uniquely named sibling and one rename, so that readers
    (and concurrent writers of the same name) see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON object as one line (a report of metrics.jsonl, balance.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Every object of a JSON Lines file; [] when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
