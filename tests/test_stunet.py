"""STU-Net S/B/L/H against facts about the reference network (uni-medical/STU-Net's STUNetTrainer,
stored in data/stunet_reference.json with how they were made): every state_dict name and shape, the
paper's parameter counts, the outputs of a fixed seeded network; and a training step of each size."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

from headzoo.backbone import build_network, get_backbone, stunet_architecture

FACTS = json.loads((Path(__file__).parent / "data" / "stunet_reference.json").read_text())
SIZES = FACTS["sizes"]
WIDTH_DEPTH = {"stu-s": (16, 1), "stu-b": (32, 1), "stu-l": (64, 2), "stu-h": (96, 3)}


def _from_plan(architecture: dict, num_classes: int, deep_supervision: bool = False):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        1,
        num_classes,
        deep_supervision=deep_supervision,
    )


def _meta(architecture: dict, num_classes: int = 1):
    with torch.device("meta"):
        return _from_plan(architecture, num_classes)


def _shapes(name: str) -> dict[str, list[int]]:
    """The table's entry as the paper counts it: 1 input channel, 105 classes (TotalSegmentator)."""
    return {k: list(v.shape) for k, v in _meta(get_backbone(name)[0], 105).state_dict().items()}


def _digest(shapes: dict[str, list[int]]) -> str:
    text = "\n".join(f"{k} {','.join(map(str, shape))}" for k, shape in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _layout(shapes: dict[str, list[int]]) -> dict[str, list[list[int]]]:
    """Per stage [blocks, input channels, output channels]; per upsample/seg conv [input, output] channels."""

    def indices(prefix: str, position: int) -> list[int]:
        return sorted({int(k.split(".")[position]) for k in shapes if k.startswith(prefix)})

    layout = {}
    for part in ("conv_blocks_context", "conv_blocks_localization"):
        layout[part] = [
            [
                len(indices(f"{part}.{s}.", 2)),
                shapes[f"{part}.{s}.0.conv1.weight"][1],
                shapes[f"{part}.{s}.0.conv1.weight"][0],
            ]
            for s in indices(f"{part}.", 1)
        ]
    for part, weight in (("upsample_layers", "conv.weight"), ("seg_outputs", "weight")):
        layout[part] = [shapes[f"{part}.{i}.{weight}"][1::-1] for i in indices(f"{part}.", 1)]
    return layout


@pytest.mark.parametrize("name", ["stu-s", "stu-b"])
def test_state_dict_names_and_shapes_are_the_references(name):
    assert _shapes(name) == SIZES[name]["state_dict"]


@pytest.mark.parametrize("name", list(SIZES))
def test_layout_is_the_references(name):
    shapes = _shapes(name)
    assert len(shapes) == SIZES[name]["state_dict_keys"]
    if "layout" in SIZES[name]:
        assert _layout(shapes) == SIZES[name]["layout"]
    assert _digest(shapes) == SIZES[name]["state_dict_sha256"]  # every name and shape


def test_a_reference_checkpoint_loads_into_the_backbone():
    """STU-Net's checkpoints load by name: all but the segmentation convs (the head's job) go into the
    backbone headzoo builds."""
    backbone, _ = build_network(get_backbone("stu-s")[0], 1, seed=0)
    checkpoint = {
        k: torch.full(shape, 0.5)
        for k, shape in SIZES["stu-s"]["state_dict"].items()
        if not k.startswith("seg_outputs.")
    }
    result = backbone.load_state_dict(checkpoint, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("seg_outputs.") for k in result.missing_keys)
    assert (backbone.conv_blocks_localization[-1][0].conv2.weight == 0.5).all()


@pytest.mark.parametrize("name", list(SIZES))
def test_parameter_count_matches_the_paper(name):
    # the paper counts every parameter, the five (deep supervision) 1×1×1 segmentation convs included
    count = sum(p.numel() for p in _meta(get_backbone(name)[0], 105).parameters())
    assert count == SIZES[name]["parameters"]
    assert round(count / 1e6, 2) == FACTS["paper"]["parameters_M"][name]


@pytest.mark.slow  # STU-Net forwards in float64
def test_forward_matches_the_reference():
    """The reference's outputs for a seeded network (default initialisation) on a seeded input, in
    float64 so that no platform's rounding hides a changed layer; small, deep enough for 2 blocks a
    stage, with an anisotropic and two unit strides."""
    facts = FACTS["forward"]
    network = facts["network"]
    architecture = stunet_architecture(8, 2, 32)
    architecture["arch_kwargs"]["strides"][1] = [2, 2, 1]
    for key in ("features_per_stage", "n_blocks_per_stage", "kernel_sizes", "strides"):
        assert architecture["arch_kwargs"][key] == network[key], key
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _from_plan(architecture, network["num_classes"], deep_supervision=True).double().eval()
    image = torch.randn(facts["input_shape"], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        outputs = model(image)
        model.decoder.deep_supervision = False
        single = model(image)
    expected = facts["deep_supervision_outputs"]
    assert len(outputs) == len(expected) == 5
    assert torch.equal(single, outputs[0])
    close = {"rel": 1e-9, "abs": 1e-9}
    for output, stats in zip(outputs, expected):
        assert list(output.shape) == stats["shape"]
        assert output.mean().item() == pytest.approx(stats["mean"], **close)
        assert output.std().item() == pytest.approx(stats["std"], **close)
        assert output.mean(dim=(0, 2, 3, 4)).tolist() == pytest.approx(stats["class_means"], **close)
        flat = output.flatten()
        assert {i: flat[int(i)].item() for i in stats["values"]} == pytest.approx(stats["values"], **close)


def _available_memory_bytes() -> int:
    text = open("/proc/meminfo").read() if os.path.exists("/proc/meminfo") else ""
    match = re.search(r"MemAvailable:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else 0


@pytest.mark.parametrize(
    "name",
    [
        "stu-s",
        pytest.param("stu-b", marks=pytest.mark.slow),
        pytest.param("stu-l", marks=pytest.mark.slow),
        pytest.param("stu-h", marks=pytest.mark.slow),
    ],
)
def test_training_step_at_a_small_patch(name):
    """Forward and backward at 32³ (strides as nnU-Net plans them for that patch); every used weight
    gets a gradient."""
    architecture = stunet_architecture(*WIDTH_DEPTH[name], 32)
    parameters = sum(p.numel() for p in _meta(architecture).parameters())
    needed = parameters * 4 * 2 + 2 * 2**30  # weights, gradients, and room for the activations
    if _available_memory_bytes() < needed:
        pytest.skip(f"{name} needs about {needed / 2**30:.0f} GiB free for a training step")
    backbone, features = build_network(architecture, 1, seed=0)
    output = backbone(torch.randn(1, 1, 32, 32, 32))
    assert output.shape == (1, WIDTH_DEPTH[name][0], 32, 32, 32) and features == WIDTH_DEPTH[name][0]
    output.square().mean().backward()
    for parameter_name, parameter in backbone.named_parameters():
        if parameter_name.startswith("seg_outputs."):  # the lower-resolution seg convs: deep supervision is off
            continue
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
