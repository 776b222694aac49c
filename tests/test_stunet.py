"""STU-Net S/B/L/H: the paper's parameter counts, the reference network's names and outputs, and a
training step of each size."""
import os
import re

import pytest
import torch

from headzoo.backbone import build_network, get_backbone, stunet_architecture
from stunet_reference import STUNet as ReferenceSTUNet

# STU-Net paper, Table 2: parameters with a 1-channel input and a 105-channel output (TotalSegmentator)
PAPER_PARAMETERS_M = {"stu-s": 14.6, "stu-b": 58.26, "stu-l": 440.30, "stu-h": 1457.33}
WIDTH_DEPTH = {"stu-s": (16, 1), "stu-b": (32, 1), "stu-l": (64, 2), "stu-h": (96, 3)}


def _from_plan(architecture: dict, num_classes: int, deep_supervision: bool = False):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture["_kw_requires_import"], 1, num_classes,
                                  deep_supervision=deep_supervision)


@pytest.mark.parametrize("name", list(PAPER_PARAMETERS_M))
def test_parameter_count_matches_the_paper(name):
    # the paper counts every parameter, the five (deep supervision) 1×1×1 segmentation convs included
    with torch.device("meta"):
        network = _from_plan(get_backbone(name)[0], 105)
    count = sum(p.numel() for p in network.parameters())
    assert count / 1e6 == pytest.approx(PAPER_PARAMETERS_M[name], rel=0.01)


def _reference(architecture: dict, num_classes: int, deep_supervision: bool) -> ReferenceSTUNet:
    """STUNetTrainer's construction: its pool strides are the plan's, without the first stage's."""
    kwargs = architecture["arch_kwargs"]
    return ReferenceSTUNet(1, num_classes, depth=kwargs["n_blocks_per_stage"], dims=kwargs["features_per_stage"],
                           pool_op_kernel_sizes=kwargs["strides"][1:], conv_kernel_sizes=kwargs["kernel_sizes"],
                           enable_deep_supervision=deep_supervision)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_reference_checkpoint_loads_and_gives_the_same_outputs(deep_supervision):
    architecture = stunet_architecture(8, 2, 32)  # small and quick; the anisotropic stride below too
    architecture["arch_kwargs"]["strides"][1] = [2, 2, 1]
    torch.manual_seed(0)
    reference = _reference(architecture, 7, deep_supervision)
    ours = _from_plan(architecture, 7, deep_supervision)
    # a reference checkpoint loads with every name and shape matching (strict)
    ours.load_state_dict(reference.state_dict(), strict=True)
    image = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        expected, actual = reference(image), ours(image)
    if deep_supervision:
        assert isinstance(expected, tuple) and len(actual) == len(expected) == 5
        for e, a in zip(expected, actual):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        assert actual.shape == (2, 7, 32, 32, 16)


def test_stu_s_table_entry_is_stunet_trainer_small():
    architecture = get_backbone("stu-s")[0]
    reference = _reference(architecture, 105, True)
    ours = _from_plan(architecture, 105, True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}


def _available_memory_bytes() -> int:
    text = open("/proc/meminfo").read() if os.path.exists("/proc/meminfo") else ""
    match = re.search(r"MemAvailable:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else 0


@pytest.mark.parametrize("name", [
    "stu-s", "stu-b",
    pytest.param("stu-l", marks=pytest.mark.slow),
    pytest.param("stu-h", marks=pytest.mark.slow),
])
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


def _meta(architecture: dict):
    with torch.device("meta"):
        return _from_plan(architecture, 1)

