"""The toy dataset of §2.4 of the chunked-basis paper (Jaubert et al., *Breaking the Memory Barrier:
Efficient Multi-Class 3D Segmentation for Hundreds of Classes*, MIDL 2026), written in nnU-Net's raw format.

C−1 foreground shapes (label 0 is background), each a union of 2–4 random primitives in a
box, eroded while it covers more than 60% of the box, then opened and closed. Volume g holds
the classes 1 + (g + k·step) mod (C−1), k < N_objects, placed greedily without overlap; object
voxels are drawn from N(μ_c, σ_c), the background is noise. Everything derives from one seed.

The `protocol` preset (headzoo's CPU accuracy protocol, not §2.4) replaces the one intensity channel
by B code channels: class c has a distinct B-bit code word, and in channel k its voxels are bright
where bit k is set, dim where not. A per-class intensity does not survive nnU-Net's per-channel
brightness/contrast/gamma augmentation and the backbone's instance norm (issue 9: Dice ≈ 0 at
C = 100 either way); a bright-versus-dim pattern across channels does, so the class is learnable in
minutes on a CPU and what separates the heads is how they map features to many classes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from headzoo.errors import HeadzooError
from headzoo.progress import progress_bar

COVERAGE_LIMIT = 0.6
CODE_BRIGHT, CODE_DIM, CODE_NOISE = 500.0, 100.0, 20.0  # a code channel inside an object: bit set / not set, σ
LEXICODE_WORDS = 4096  # class codes are drawn from (at most) this many words of a lexicode


@dataclass(frozen=True)
class ToyPreset:
    volume: int  # edge of the cubic volume, voxels
    box: int  # edge of the cubic box a shape lives in
    objects: int  # objects per volume (at most C−1)
    volumes: int  # volumes in all
    train: int  # the first `train` volumes are training cases, the rest test cases
    code_bits: int = 0  # 0: one channel, class c ~ N(μ_c, σ_c) (§2.4); B > 0: B channels carrying a class code


PRESETS: dict[str, ToyPreset] = {
    "paper": ToyPreset(volume=192, box=30, objects=100, volumes=1000, train=900),
    # Small enough for `headzoo run --classes 1000` in minutes on 2 CPU cores, while every class of
    # C ≤ 1000 occurs in training (tests/test_toy.py checks each C): the training volumes g < T hold
    # the classes g + k·step, k < 16, step = (C−1)//16, a contiguous run of T + 15·step ≥ C−1 classes
    # once T ≥ 76 (with T = 72, C = 944, 959, 960, 974–976 and 989–992 missed a few).
    "small": ToyPreset(volume=48, box=12, objects=16, volumes=84, train=76),
    # The CPU accuracy protocol: 16 code channels (minimum Hamming distance 6 at C ≤ 128, 4 at C ≤ 2048)
    # and twice the objects of `small` (32 per 48³ volume, all placed), so a 32³ patch holds more labelled
    # voxels of more classes; every class of C ≤ 1000 occurs in training (checked in tests/test_toy.py).
    "protocol": ToyPreset(volume=48, box=12, objects=32, volumes=80, train=72, code_bits=16),
    # The protocol at C = 1000: the same 16-bit class code, twice the objects of `protocol` in smaller boxes
    # (64 per 48³ volume, 10³ boxes) and 288 training volumes, so each of 999 classes has about 18 training
    # instances instead of 2.3, and a 32³ patch holds about twice the objects (more class views per step).
    "protocol1000": ToyPreset(volume=48, box=10, objects=64, volumes=300, train=288, code_bits=16),
    # For tests: seconds to generate and preprocess.
    "tiny": ToyPreset(volume=32, box=10, objects=6, volumes=12, train=10),
}


def get_preset(name: str) -> ToyPreset:
    if name not in PRESETS:
        raise HeadzooError(f"unknown toy preset '{name}' (choose from {', '.join(PRESETS)})")
    return PRESETS[name]


def perlin_noise(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """3D Perlin gradient noise on a size³ grid with `cells` lattice cells per axis, in about [−1, 1]."""
    gradients = rng.normal(size=(cells + 1, cells + 1, cells + 1, 3))
    gradients /= np.linalg.norm(gradients, axis=-1, keepdims=True)
    coords = np.stack(np.meshgrid(*[np.linspace(0, cells, size, endpoint=False)] * 3, indexing="ij"), -1)
    cell = np.floor(coords).astype(int)
    frac = coords - cell
    fade = frac**3 * (frac * (frac * 6 - 15) + 10)
    noise = np.zeros((size,) * 3)
    for corner in np.ndindex(2, 2, 2):
        offset = np.array(corner)
        g = gradients[cell[..., 0] + offset[0], cell[..., 1] + offset[1], cell[..., 2] + offset[2]]
        dot = np.sum(g * (frac - offset), axis=-1)
        weight = np.prod(np.where(offset == 1, fade, 1 - fade), axis=-1)
        noise += weight * dot
    return noise


def _primitive(box: int, rng: np.random.Generator) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(box) + 0.5] * 3, indexing="ij"), -1)
    kind = rng.integers(3)
    if kind == 2:
        noise = perlin_noise(box, int(rng.integers(2, 4)), rng)
        return noise > np.quantile(noise, rng.uniform(0.6, 0.85))
    center = rng.uniform(0.3, 0.7, 3) * box
    radii = rng.uniform(0.15, 0.4, 3) * box
    exponent = 2.0 if kind == 0 else rng.uniform(0.6, 4.0)  # ellipsoid or superellipsoid
    return np.sum(np.abs((grid - center) / radii) ** exponent, axis=-1) <= 1.0


def make_shape(box: int, rng: np.random.Generator) -> np.ndarray:
    """One class's binary shape in a box³ grid, never empty."""
    while True:
        shape = np.zeros((box,) * 3, bool)
        for _ in range(rng.integers(2, 5)):
            shape |= _primitive(box, rng)
        while shape.mean() > COVERAGE_LIMIT:
            shape = ndimage.binary_erosion(shape)
        shape = ndimage.binary_closing(ndimage.binary_opening(shape))
        if shape.sum() >= 8:
            return shape


def volume_classes(g: int, num_classes: int, objects: int) -> list[int]:
    """Labels of volume g: 1 + (g + k·step) mod (C−1), an arithmetic progression over the C−1 shapes."""
    shapes = num_classes - 1
    n = min(objects, shapes)
    step = max(1, shapes // n)
    return [1 + (g + k * step) % shapes for k in range(n)]


def lexicode(bits: int, distance: int, words: int) -> np.ndarray:
    """The first `words` words of the binary lexicode: 0, 1, …, 2^bits − 1 in order, each kept when it is at
    least `distance` (Hamming) from every word kept before (fewer if the code has fewer)."""
    code, candidates = [], np.arange(2**bits)
    while candidates.size and len(code) < words:
        code.append(candidates[0])  # the smallest word far enough from all kept so far
        candidates = candidates[np.bitwise_count(candidates ^ candidates[0]) >= distance]
    return np.array(code)


def class_codes(shapes: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    """(shapes, bits) bool: a distinct non-zero code word per class, drawn at random from the lexicode with
    the largest minimum Hamming distance that has `shapes` non-zero words (lexicodes are linear, so every
    bit is set in half of the code's words)."""
    if shapes > 2**bits - 1:
        raise HeadzooError(f"a {bits}-bit class code has only {2**bits - 1} non-zero words, {shapes} classes asked for")
    for distance in range(bits, 0, -1):
        code = lexicode(bits, distance, max(shapes + 1, LEXICODE_WORDS))
        if len(code) > shapes:
            break
    words = rng.choice(code[1:], shapes, replace=False)
    return (words[:, None] >> np.arange(bits)) & 1 == 1


def make_volume(
    g: int, shapes: list[np.ndarray], appearance: np.ndarray, preset: ToyPreset, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """Image (channels, *volume), label map and the number of objects that found no free place.

    `appearance` is (C, 2): each class's mean and standard deviation (one channel, §2.4), or (C, B) bool:
    each class's code (B channels; an object is bright where its bit is set, dim elsewhere)."""
    label = np.zeros((preset.volume,) * 3, np.uint16)
    unplaced = 0
    for c in volume_classes(g, len(shapes) + 1, preset.objects):
        shape = shapes[c - 1]
        for _ in range(200):  # greedy: first random position that overlaps nothing placed so far
            x, y, z = rng.integers(0, preset.volume - preset.box + 1, 3)
            region = label[x : x + preset.box, y : y + preset.box, z : z + preset.box]
            if not region[shape].any():
                region[shape] = c
                break
        else:
            unplaced += 1
    if preset.code_bits:
        mean = np.where(appearance[label], CODE_BRIGHT, CODE_DIM).transpose(3, 0, 1, 2)
        std = np.full(mean.shape, CODE_NOISE)
    else:
        mean, std = appearance[label, 0][None], appearance[label, 1][None]
    image = rng.normal(0.0, 20.0, mean.shape)  # background noise
    image = np.where(label > 0, mean + std * rng.standard_normal(mean.shape), image)
    return image.astype(np.float32), label, unplaced


def source_classes(num_classes: int, sources: int, preset: ToyPreset) -> list[list[int]]:
    """Partial labels: training volume g comes from source g mod K, and each class is annotated by the
    source of the first training volume that holds it, so every class is labelled somewhere."""
    owner = {}
    for g in range(preset.train):
        for c in volume_classes(g, num_classes, preset.objects):
            owner.setdefault(c, g % sources)
    return [sorted(c for c, s in owner.items() if s == source) for source in range(sources)]


def _write_nifti(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def write_toy_dataset(out: Path, num_classes: int, preset_name: str = "small", seed: int = 0, sources: int = 1) -> Path:
    """Write the toy dataset in nnU-Net raw format to `out`, atomically (temp folder, then rename).

    With sources = K > 1 the training volumes come from K source datasets (volume g from source
    g mod K), each annotating only its own classes; the others are written as background. Test
    volumes stay fully labelled. dataset.json records each case's source and each source's classes.
    """
    if num_classes < 2:
        raise HeadzooError(f"--classes must be at least 2, got {num_classes}")
    if not 1 <= sources <= num_classes - 1:
        raise HeadzooError(f"--partial must be between 1 and C−1 = {num_classes - 1} sources, got {sources}")
    preset = get_preset(preset_name)
    out = Path(out)
    if out.exists():
        raise HeadzooError(f"{out} already exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    staging = Path(tempfile.mkdtemp(prefix=".toy-", dir=out.parent))
    try:
        for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (staging / folder).mkdir()
        with progress_bar() as bar:
            task = bar.add_task(f"toy shapes (C={num_classes})", total=num_classes - 1)
            shapes = []
            for _ in range(num_classes - 1):
                shapes.append(make_shape(preset.box, rng))
                bar.advance(task)
            if preset.code_bits:
                appearance = np.zeros((num_classes, preset.code_bits), bool)
                appearance[1:] = class_codes(num_classes - 1, preset.code_bits, rng)
            else:
                appearance = np.zeros((num_classes, 2))
                appearance[1:, 0] = rng.uniform(100.0, 1000.0, num_classes - 1)
                appearance[1:, 1] = rng.uniform(5.0, 50.0, num_classes - 1)
            unplaced = 0
            annotated = source_classes(num_classes, sources, preset)
            case_sources = {}
            task = bar.add_task("toy volumes", total=preset.volumes)
            for g in range(preset.volumes):
                image, label, missed = make_volume(g, shapes, appearance, preset, rng)
                unplaced += missed
                split = "Tr" if g < preset.train else "Ts"
                if split == "Tr" and sources > 1:
                    case_sources[f"toy_{g:04d}"] = g % sources
                    label[~np.isin(label, [0, *annotated[g % sources]])] = 0
                for channel, plane in enumerate(image):
                    _write_nifti(plane, staging / f"images{split}" / f"toy_{g:04d}_{channel:04d}.nii.gz")
                _write_nifti(label, staging / f"labels{split}" / f"toy_{g:04d}.nii.gz")
                bar.advance(task)
        dataset = {
            "channel_names": (
                {str(k): f"code bit {k}" for k in range(preset.code_bits)} if preset.code_bits else {"0": "toy"}
            ),
            "labels": {"background": 0, **{f"class_{c:04d}": c for c in range(1, num_classes)}},
            "numTraining": preset.train,
            "file_ending": ".nii.gz",
            "headzoo": {
                "preset": preset_name,
                **asdict(preset),
                "classes": num_classes,
                "seed": seed,
                "unplaced_objects": unplaced,
                "sources": sources,
                **({"source_classes": annotated, "case_sources": case_sources} if sources > 1 else {}),
            },
        }
        (staging / "dataset.json").write_text(json.dumps(dataset, indent=1))
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
