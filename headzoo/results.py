"""The long-format results file: one JSON line per run, keyed; validated, locked and written atomically."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import stat
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from headzoo.config import KEY_FIELDS, run_settings
from headzoo.errors import HeadzooError
from headzoo.locking import file_lock

# 2: the key covers the toy preset, the dataset fingerprint, the memory budget, warm-up, learning rate,
#    gradient clipping and autocast; every record has a run id and the run's every setting (config.RunConfig). v1 rows (no
#    clipping; CPU, where autocast does nothing) are migrated on read.
# 3: `dice_mean` is nnU-Net's Dice (per case, then per class; a false positive in a case without the class
#    scores 0), `dice_pooled_mean` the old pooled one; every record has an `environment`. v1/v2 rows are
#    marked `dice_definition: pooled` on read (their dice_mean is the pooled Dice).
# 4: a record's `request` holds the run's settings as asked for (config.to_record of the RunConfig given), the key's
#    source; its own settings are the resolved ones (classes, patch, run id). A row without a patch (a sweep's
#    crash row) reads with its backbone's default patch and, for a v3 row, the settings it was written with as its
#    request; other v3 rows have no request and are keyed by their own settings.
SCHEMA_VERSION = 4
# a record's `dice_mean`: nnU-Net's foreground_mean (per case, then per class; inference.DiceCounter)
DICE_DEFINITION = "nnunet"


def record_key(record: dict, ignore_device: bool = False) -> str:
    """The results key (config.KEY_FIELDS) of the run as it was asked for: the settings of the record's `request`
    where it has one (a sweep cell without --patch is one cell whatever patch the plan gives it), with the
    dataset fingerprint and device name; `ignore_device` leaves the device name out."""
    fields = {**record, **record.get("request", {})}
    return json.dumps(
        [None if ignore_device and k == "device_name" else fields.get(k) for k in KEY_FIELDS], sort_keys=True
    )


def migrate(record: dict) -> dict:
    """A record in the current schema, one version step after another."""
    version = record.get("schema_version", 1)
    if version == 1:
        record = _migrate_v1(record)
    elif version == 2:
        record = {
            **record,
            "dice_definition": "pooled",
            "dice_pooled_mean": record.get("dice_mean"),
            "schema_version": 3,
        }
    if record.get("schema_version") == 3:
        record = {**record, "schema_version": 4}
    return {**record, **_resolved_patch(record)}


def _resolved_patch(record: dict) -> dict:
    """A row without a patch (a sweep's crash row: the cell failed before resolving it, e.g. on a bad head
    option) gets its backbone's default, the plan's patch its group's other rows record; its request (for a v3
    row: the settings it was written with) keeps the patch null."""
    from headzoo.backbone import BACKBONES

    if record.get("patch") is not None or record.get("backbone") not in BACKBONES:
        return {}
    request = record.get("request") or {f.name: record.get(f.name) for f, _ in run_settings()}
    return {"request": request, "patch": [BACKBONES[record["backbone"]][1]] * 3}


def _migrate_v1(record: dict) -> dict:
    """A v1 row (before the key covered the dataset) in schema 3; they were all toy runs."""
    preset = re.search(r"HeadzooToy_([A-Za-z0-9-]+)_C", str(record.get("dataset", "")))
    defaults = {
        "preset": preset.group(1) if preset else None,
        "dataset_folder": None,
        "dataset_fingerprint": None,
        "device": "auto",
        "lr": 0.0025,
        "grad_clip": None,
        "amp": True,
        "eval_every": None,
        "curve": None,
        "run_id": uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(record, sort_keys=True)).hex[:16],
        "dice_definition": "pooled",
        "dice_pooled_mean": record.get("dice_mean"),
    }
    return {**defaults, **record, "schema_version": 3}


def strict_json(record: dict, default=None) -> str:
    """One JSON line; a NaN or infinity is null (strict JSON), never written as NaN. `default`: json.dumps's,
    for values JSON has no type for (None: such a value is an error)."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(record), sort_keys=True, allow_nan=False, default=default)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _nullable(check):
    return lambda value: value is None or check(value)


def _curve_point(point) -> bool:
    fraction = _nullable(lambda v: _is_number(v) and 0 <= v <= 1)
    return (
        isinstance(point, dict)
        and _is_int(point.get("step"))
        and point["step"] >= 1
        and _is_number(point.get("train_time_s"))
        and point["train_time_s"] >= 0
        and all(fraction(point.get(k)) for k in ("dice_mean", "dice_worst10_mean"))
    )


_TEXT = (lambda v: isinstance(v, str), "a string")
_TEXT_OR_NULL = (_nullable(lambda v: isinstance(v, str)), "a string or null")
_COUNT = (_nullable(lambda v: _is_int(v) and v >= 0), "an integer of at least 0, or null")
_SECONDS = (_nullable(lambda v: _is_number(v) and v >= 0), "a number of at least 0, or null")
_FRACTION = (_nullable(lambda v: _is_number(v) and 0 <= v <= 1), "a number in [0, 1], or null")
#: what each field of a row must hold (a row may lack any field but ROW_REQUIRED; fields not named here are
#: not checked): config.RunConfig's settings, then what a run measured
ROW_FIELDS: dict[str, tuple] = {
    "head": _TEXT,
    "options": (lambda v: isinstance(v, dict), "an object of head options"),
    "classes": (lambda v: _is_int(v) and v >= 2, "an integer of at least 2"),
    "backbone": _TEXT,
    "patch": (
        _nullable(lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(e) and e >= 1 for e in v)),
        "a list of 3 positive integers, or null",
    ),
    "batch": (lambda v: _is_int(v) and v >= 1, "an integer of at least 1"),
    "steps": (lambda v: _is_int(v) and v >= 1, "an integer of at least 1"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer of at least 0"),
    "partial": (lambda v: _is_int(v) and v >= 1, "an integer of at least 1"),
    "memory_limit_bytes": (_nullable(lambda v: _is_int(v) and v >= 1), "a positive integer or null"),
    "preset": _TEXT_OR_NULL,
    "dataset_folder": _TEXT_OR_NULL,
    "warmup": (lambda v: _is_int(v) and v >= 0, "an integer of at least 0"),
    "lr": (lambda v: _is_number(v) and v > 0, "a number above 0"),
    "grad_clip": (_nullable(lambda v: _is_number(v) and v > 0), "a number above 0, or null"),
    "amp": (lambda v: isinstance(v, bool), "true or false"),
    "eval_every": (_nullable(lambda v: _is_int(v) and v >= 1), "a positive integer or null"),
    "device": _TEXT,
    "run_id": _TEXT_OR_NULL,
    "request": (
        lambda v: isinstance(v, dict) and isinstance(v.get("head"), str),
        "an object of the run's settings as asked for",
    ),
    "schema_version": (
        lambda v: _is_int(v) and 1 <= v <= SCHEMA_VERSION,
        f"an integer from 1 to {SCHEMA_VERSION} (a later one is a newer headzoo's)",
    ),
    "status": (lambda v: v in ("ok", "oom", "error"), "ok, oom or error"),
    "error": _TEXT_OR_NULL,
    "device_name": _TEXT_OR_NULL,
    "dataset_fingerprint": _TEXT_OR_NULL,
    "options_resolved": (lambda v: isinstance(v, dict), "an object"),
    "dice_mean": _FRACTION,
    "dice_worst10_mean": _FRACTION,
    "dice_pooled_mean": _FRACTION,
    "dice_classes_present": _COUNT,
    "peak_memory_bytes": _COUNT,
    "peak_rss_bytes": _COUNT,
    "timed_steps": _COUNT,
    **{
        k: _SECONDS
        for k in (
            "step_time_median_s",
            "step_time_p20_s",
            "step_time_p80_s",
            "train_time_s",
            "data_time_s",
            "eval_time_s",
            "wall_time_s",
            "data_share",
        )
    },
    "loss_first": (_nullable(_is_number), "a number or null"),
    "loss_last": (_nullable(_is_number), "a number or null"),
    "curve": (
        _nullable(lambda v: isinstance(v, list) and all(_curve_point(p) for p in v)),
        "null or a list of points {step, train_time_s, dice_mean}",
    ),
}
#: what every row has; the leaderboard needs more of each (a sweep's crash row has those too, its device null)
ROW_REQUIRED = ("head", "status")
LEADERBOARD_REQUIRED = (*ROW_REQUIRED, "options", "classes", "seed", "device_name")


def validate_row(row, where: str, required: tuple[str, ...] = ROW_REQUIRED) -> dict:
    """`row` as read from a results file, or one line naming `where` (file:line) and the first field that is
    missing or wrong: a row is never dropped, shown with a wrong value, or a traceback."""
    if not isinstance(row, dict):
        raise HeadzooError(f"{where} is not a JSON object: {json.dumps(row)[:80]}")
    missing = [k for k in required if k not in row]
    if missing:
        raise HeadzooError(f"{where} lacks {', '.join(missing)}")
    for name, (check, words) in ROW_FIELDS.items():
        if name in row and not check(row[name]):
            raise HeadzooError(f"{where}: {name} must be {words}, got {json.dumps(row[name])[:80]}")
    if row["status"] == "ok" and row.get("dice_mean") is None and row.get("dice_classes_present", 0) > 0:
        raise HeadzooError(f"{where}: an ok run that scored {row['dice_classes_present']} classes has no dice_mean")
    return row


def _file_mode(path: Path, role: str) -> int | None:
    """The mode of the file `path` names (through links); None where there is none yet. A symlink loop or
    anything but a regular file (a folder, device, FIFO or socket, which a rewrite would replace or a read
    would hang on) is one line."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as error:
        raise HeadzooError(f"{role}{path}: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        raise HeadzooError(f"{role}{path} is a directory; give a .jsonl file path")
    if not stat.S_ISREG(mode):
        raise HeadzooError(f"{role}{path} is not a regular file (a device, FIFO or socket); give a .jsonl file path")
    return mode


def check_results_file(path: Path) -> None:
    """Fail now, in one line, if the results file cannot be read or written later (before any training)."""
    path = Path(path)
    exists = _file_mode(path, "--out ") is not None
    target = path.resolve()
    folder = target.parent
    if not folder.is_dir():
        raise HeadzooError(f"--out {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (exists and not os.access(target, os.W_OK)):
        raise HeadzooError(f"--out {path} is not writable")
    read_records(path)


def read_records(path: Path, required: tuple[str, ...] = ROW_REQUIRED) -> list[dict]:
    """Every row of a results file, validated (validate_row, with the `required` fields) and in the current
    schema; a line that is not a UTF-8 JSON object of a valid row, or a second row with one key, is one line
    naming file:line."""
    path = Path(path)
    records, lines = [], {}
    for number, row in json_lines(path):
        where = f"{path}:{number}"
        record = migrate(validate_row(row, where, required))
        first = lines.setdefault(record_key(record), number)
        if first != number:
            raise HeadzooError(
                f"{where} repeats the results key of line {first} (same settings, seed, dataset and "
                "device): keep one of them"
            )
        records.append(record)
    return records


def json_lines(path: Path) -> list[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSON-lines file (results, benchmark records); a line
    that is not UTF-8 JSON is one line naming file:line. No file: no lines."""
    path = Path(path)
    if _file_mode(path, "") is None:
        return []
    values = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise HeadzooError(f"{where} is not UTF-8 text ({error.reason} at byte {error.start})") from None
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except ValueError as error:
            raise HeadzooError(f"{where} is not a JSON line ({error})") from error
    return values


def _lock(target: Path):
    return file_lock(target.with_name(f".{target.name}.lock"))


def upsert_record(path: Path, record: dict) -> None:
    """Replace the row with the same key (and a crash row of the same cell whose device was unknown, and a row
    from before records had a request whose settings are this record's resolved ones), or append; then
    atomically swap the file in. Where the file cannot take it (a bad line written meanwhile, a full disk), the
    record is kept in a file of its own, which the one-line error names."""
    target = Path(path).resolve()  # write through a symlink to the shared file it points at
    record = migrate(record)
    key, loose = record_key(record), record_key(record, ignore_device=True)
    resolved = record_key({k: v for k, v in record.items() if k != "request"})

    def replaced(row: dict) -> bool:
        return (
            record_key(row) == key
            or (row.get("device_name") is None and record_key(row, True) == loose)
            or ("request" not in row and record_key(row) == resolved)
        )

    try:
        validate_row(json.loads(strict_json(record)), "the new record")
        with _lock(target):
            remove_stale_temporaries(target)
            rewrite_records(target, [r for r in read_records(target) if not replaced(r)] + [record])
    except (HeadzooError, OSError) as error:
        raise HeadzooError(f"{error}; this run's record is kept in {_keep(target, record)}") from error


def _keep(target: Path, record: dict) -> Path:
    """Write `record` beside the results file it could not join (or in the temporary folder); its path."""
    name = f"{target.name}.unrecorded-{record.get('run_id') or uuid.uuid4().hex[:16]}.json"
    for folder in (target.parent, Path(tempfile.gettempdir())):
        try:
            (folder / name).write_text(strict_json(record) + "\n")
            return folder / name
        except OSError:
            continue
    raise HeadzooError(f"could not write the record anywhere: {strict_json(record)}")


def _temporaries(path: Path) -> list[Path]:
    """rewrite_records' temporary files for `path`: '.NAME.tmp-XXXXXXXX' (and mkstemp's '.NAME.XXXXXXXX' of
    headzoo before the tmp- prefix)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp-)?[a-z0-9_]{{8}}")
    return [p for p in path.parent.glob(f".{glob.escape(path.name)}.*") if pattern.fullmatch(p.name)]


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files a killed writer left (a writer holds the lock while its temporary exists, so
    under the lock every one is stale)."""
    for stale in _temporaries(path):
        stale.unlink(missing_ok=True)


def merge_records(
    path: Path, new: list[dict], key_fields: Sequence[str], read: Callable[[Path], list[dict]]
) -> list[dict]:
    """Merge `new` into the records file `path`, its rows as `read` validates them (a benchmark's own reader): a new
    row replaces the old row with the same `key_fields` values; written atomically; the merged rows."""

    def key(row: dict) -> str:
        return json.dumps([row.get(k) for k in key_fields])

    replaced = {key(r) for r in new}
    merged = [r for r in read(path) if key(r) not in replaced] + new
    rewrite_records(path, merged)
    return merged


def rewrite_records(path: Path, records: list[dict]) -> None:
    """Write `records` to `path` atomically (temporary file + rename), one strict JSON line each, keeping the
    file's mode."""
    write_text_atomically(path, "".join(strict_json(r) + "\n" for r in records))


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temporary file + rename): a reader sees the old file or the new one,
    never a part; the file's mode is kept."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644  # mkstemp's 0600 is not for sharing
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
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


LEADERBOARD_TITLE = "# headzoo leaderboard"  # the first line of every README.md leaderboard.render writes


def prepare_leaderboard_folder(out: Path) -> None:
    """Make `out` ready for a leaderboard, touching nothing headzoo did not write: a file, or a folder whose
    README.md is not a headzoo leaderboard, is refused; of an earlier leaderboard only the plots its README
    showed are removed (a group that no longer exists leaves none behind)."""
    if out.exists() and not out.is_dir():
        raise HeadzooError(f"--out {out} is a file; give a folder for the leaderboard's README.md and plots")
    readme = out / "README.md"
    if readme.exists():
        text = readme.read_text(errors="replace")
        if not text.startswith(LEADERBOARD_TITLE + "\n"):
            raise HeadzooError(
                f"--out {out} holds a README.md that is not a headzoo leaderboard; give another folder "
                "(headzoo writes README.md and plots there)"
            )
        for name in re.findall(r"!\[[^\]]*\]\(([^)/\\]+\.png)\)", text):
            (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HeadzooError(f"--out {out}: cannot create the folder ({error.strerror or error})") from None


def load_results(path: Path) -> pd.DataFrame:
    return pd.DataFrame(read_records(path))
