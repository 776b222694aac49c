"""The long-format results file: one JSON line per run, keyed; validated, locked and written atomically."""
from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
import uuid
from pathlib import Path

import pandas as pd

from headzoo.config import KEY_FIELDS
from headzoo.errors import HeadzooError
from headzoo.locking import file_lock

# 2: the key covers the toy preset, the dataset fingerprint, the memory budget, warm-up, learning rate,
#    gradient clipping and autocast; every record has a run id and the run's every setting (config.RunConfig). v1 rows (no
#    clipping; CPU, where autocast does nothing) are migrated on read.
# 3: `dice_mean` is nnU-Net's Dice (per case, then per class; a false positive in a case without the class
#    scores 0), `dice_pooled_mean` the old pooled one; every record has an `environment`. v1/v2 rows are
#    marked `dice_definition: pooled` on read (their dice_mean is the pooled Dice).
SCHEMA_VERSION = 3


def record_key(record: dict, ignore_device: bool = False) -> str:
    """The results key (config.KEY_FIELDS); `ignore_device` leaves the device name out."""
    return json.dumps([None if ignore_device and k == "device_name" else record.get(k) for k in KEY_FIELDS],
                      sort_keys=True)


def migrate(record: dict) -> dict:
    """A record in the current schema. v1 rows (before the key covered the dataset) were all toy runs."""
    if record.get("schema_version", 1) >= SCHEMA_VERSION:
        return record
    if record.get("schema_version", 1) == 2:
        return {**record, "dice_definition": "pooled", "dice_pooled_mean": record.get("dice_mean"),
                "schema_version": SCHEMA_VERSION}
    preset = re.search(r"HeadzooToy_([A-Za-z0-9-]+)_C", str(record.get("dataset", "")))
    defaults = {"preset": preset.group(1) if preset else None, "dataset_folder": None, "dataset_fingerprint": None,
                "device": "auto", "lr": 0.0025, "grad_clip": None, "amp": True, "eval_every": None, "curve": None,
                "run_id": uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(record, sort_keys=True)).hex[:16],
                "dice_definition": "pooled", "dice_pooled_mean": record.get("dice_mean")}
    return {**defaults, **record, "schema_version": SCHEMA_VERSION}


def strict_json(record: dict) -> str:
    """One JSON line; a NaN or infinity is null (strict JSON), never written as NaN."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    return json.dumps(clean(record), sort_keys=True, allow_nan=False)


def check_results_file(path: Path) -> None:
    """Fail now, in one line, if the results file cannot be read or written later (before any training)."""
    path = Path(path)
    target = path.resolve()
    folder = target.parent
    if target.is_dir():
        raise HeadzooError(f"--out {path} is a directory; give a .jsonl file path")
    if not folder.is_dir():
        raise HeadzooError(f"--out {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise HeadzooError(f"--out {path} is not writable")
    read_records(path)


def read_records(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(migrate(json.loads(line)))
            except ValueError as error:
                raise HeadzooError(f"{path}:{number} is not a JSON line ({error})") from error
    return records


def _lock(target: Path):
    return file_lock(target.with_name(f".{target.name}.lock"))


def upsert_record(path: Path, record: dict) -> None:
    """Replace the row with the same key (and a crash row of the same cell whose device was unknown), or
    append; then atomically swap the file in."""
    target = Path(path).resolve()  # write through a symlink to the shared file it points at
    record = migrate(record)
    key, loose = record_key(record), record_key(record, ignore_device=True)

    def replaced(row: dict) -> bool:
        return record_key(row) == key or (row.get("device_name") is None and record_key(row, True) == loose)

    with _lock(target):
        rewrite_records(target, [r for r in read_records(target) if not replaced(r)] + [record])


def rewrite_records(path: Path, records: list[dict]) -> None:
    """Write `records` to `path` atomically (temporary file + rename), keeping the file's mode."""
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644  # mkstemp's 0600 is not for sharing
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            for r in records:
                out.write(strict_json(r) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        if error.errno == 28:
            raise HeadzooError(f"no space left on {path.parent} to write {path.name}") from error
        raise
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_results(path: Path) -> pd.DataFrame:
    return pd.DataFrame(read_records(path))
