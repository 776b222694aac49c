"""Heads from the ``headzoo.heads`` entry-point group, loaded lazily on first use.

Built-in heads register through the same group (``pyproject.toml``) as any plug-in. Two
distributions claiming one name is an error that names both; an unknown name gets
"did you mean"; a plug-in that fails to import is reported as broken without hiding the others.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import torch

from headzoo.errors import HeadzooError
from headzoo.head import Head, check_head_options

GROUP = "headzoo.heads"


@dataclass(frozen=True)
class HeadEntry:
    name: str
    distribution: str
    entry_point: EntryPoint

    def load(self) -> type[Head]:
        try:
            cls = self.entry_point.load()
        except Exception as error:  # a broken plug-in must not take the others down
            raise HeadzooError(
                f"head '{self.name}' from {self.distribution} failed to import: {type(error).__name__}: {error}"
            ) from error
        if not (isinstance(cls, type) and issubclass(cls, Head)):
            raise HeadzooError(
                f"head '{self.name}' from {self.distribution} is not a headzoo.Head subclass ({self.entry_point.value})"
            )
        return cls


def _distribution_name(entry_point: EntryPoint) -> str:
    dist = entry_point.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


@functools.lru_cache(maxsize=1)
def _installed() -> tuple[EntryPoint, ...]:
    """The group's entry points, scanned once per process (a run looks heads up several times)."""
    return tuple(entry_points(group=GROUP))


def discover(points: list[EntryPoint] | None = None) -> dict[str, HeadEntry]:
    """Map head name → entry, without importing any head."""
    found: dict[str, HeadEntry] = {}
    for point in _installed() if points is None else points:
        entry = HeadEntry(point.name, _distribution_name(point), point)
        previous = found.get(point.name)
        if previous is not None and previous.entry_point.value != point.value:
            raise HeadzooError(
                f"head '{point.name}' is registered twice: by {previous.distribution} "
                f"({previous.entry_point.value}) and by {entry.distribution} ({point.value})"
            )
        found[point.name] = entry
    return found


def list_heads() -> list[str]:
    """Names of every registered head, sorted."""
    return sorted(discover())


def get_head_class(name: str) -> type[Head]:
    heads = discover()
    if name not in heads:
        close = difflib.get_close_matches(name, heads, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise HeadzooError(f"unknown head '{name}'{hint} (registered: {', '.join(sorted(heads))})")
    return heads[name].load()


def create_head(name: str, in_channels: int, num_classes: int, /, **options) -> Head:
    """Instantiate the head registered as ``name``; its options are checked first (head.check_head_options)."""
    cls = get_head_class(name)
    check_head_options(name, cls, options)
    try:
        return cls(in_channels, num_classes, **options)
    except TypeError as error:
        raise HeadzooError(f"head '{name}' rejected its options {options}: {error}") from error


def validate_head_options(config) -> None:
    """Build a run's head (config.RunConfig) on the meta device, which allocates nothing: an option the head
    rejects fails here, in one line, before any data is made. C is --classes, the --dataset's, or the toy's."""
    from headzoo.backbone import get_backbone
    from headzoo.config import TOY_CLASSES

    classes = config.classes
    if classes is None and config.dataset_folder is not None:
        from headzoo.validation import check_dataset_labels, validate_raw_dataset

        classes = check_dataset_labels(config.dataset_folder, validate_raw_dataset(Path(config.dataset_folder)))
    features = get_backbone(config.backbone)[0]["arch_kwargs"]["features_per_stage"][0]  # the last decoder stage's
    with torch.device("meta"):
        create_head(config.head, features, classes or TOY_CLASSES, **config.options)


def describe(cls: type[Head]) -> str:
    """The first line of a head's docstring."""
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
