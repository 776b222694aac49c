"""The long-format results file: one JSON line per run, keyed; written atomically."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from headzoo.errors import HeadzooError

SCHEMA_VERSION = 1
# DESIGN.md's key, plus `partial` (partially labelled data) and `steps` (they change what is measured)
KEY_FIELDS = ("head", "options", "classes", "partial", "backbone", "patch", "batch", "steps", "device_name", "seed")


def record_key(record: dict) -> str:
    return json.dumps([record.get(k) for k in KEY_FIELDS], sort_keys=True)


def ensure_writable(path: Path) -> None:
    """Fail now, in one line, if the results file cannot be written later."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise HeadzooError(f"--out {path} is a directory; give a .jsonl file path")
    if not folder.is_dir():
        raise HeadzooError(f"--out {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise HeadzooError(f"--out {path} is not writable")


def read_records(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as error:
                raise HeadzooError(f"{path}:{number} is not a JSON line ({error})") from error
    return records


@contextlib.contextmanager
def _locked(path: Path):
    """One writer at a time (sweep cells may finish together, e.g. under submitit)."""
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upsert_record(path: Path, record: dict) -> None:
    """Replace the row with the same key (or append), then atomically swap the file in."""
    path = Path(path)
    with _locked(path):
        _rewrite(path, [r for r in read_records(path) if record_key(r) != record_key(record)] + [record])


def _rewrite(path: Path, records: list[dict]) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(handle, "w") as out:
            for r in records:
                out.write(json.dumps(r, sort_keys=True) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a results file is for sharing
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_results(path: Path) -> pd.DataFrame:
    return pd.DataFrame(read_records(path))
