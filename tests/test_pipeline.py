import json

import pytest
import torch

import headzoo
from headzoo.backbone import BACKBONES, attach_head, build_backbone, check_patch
from headzoo.errors import HeadzooError
from headzoo.dataset import DATA_CONFIGURATION, build_backbone_from_plan, configuration_name
from headzoo.loaders import training_batches, training_loader
from headzoo.plan import _reads_intensity_statistics, prepare_toy


@pytest.mark.slow
def test_one_frozen_plan_for_every_class_count():
    few, many = prepare_toy("tiny", 3, 0), prepare_toy("tiny", 40, 0)
    for backbone in BACKBONES:
        a, b = few.configuration(backbone), many.configuration(backbone)
        assert a.patch_size == b.patch_size and a.network_arch_init_kwargs == b.network_arch_init_kwargs
        assert a.batch_size == b.batch_size and a.spacing == b.spacing
    assert few.plans["configurations"][configuration_name("small")]["patch_size"] == [32, 32, 32]
    # nothing reads the toy's intensity statistics, so its fingerprint samples few voxels
    assert set(few.plans["configurations"][DATA_CONFIGURATION]["normalization_schemes"]) == {"ZScoreNormalization"}


def test_intensity_statistics_are_sampled_in_full_only_where_ct_normalisation_reads_them():
    assert not _reads_intensity_statistics({"channel_names": {"0": "code bit 0", "1": "T1"}})
    assert _reads_intensity_statistics({"channel_names": {"0": "T1", "1": "CT"}})


@pytest.mark.slow
def test_loader_is_deterministic_and_yields_nnunet_batches():
    prepared = prepare_toy("tiny", 5, 0)
    first = next(training_loader(prepared, (16, 16, 16), 2, seed=4))
    second = next(training_loader(prepared, (16, 16, 16), 2, seed=4))
    assert first["data"].shape == (2, 1, 16, 16, 16) and first["target"].shape == (2, 1, 16, 16, 16)
    torch.testing.assert_close(first["data"], second["data"])
    torch.testing.assert_close(first["target"], second["target"])
    batch = next(training_batches(prepared, (16, 16, 16), 2, seed=4))  # the same loader, the same seeding
    assert batch["annotated"] is None and torch.equal(batch["data"], first["data"])


def test_same_seed_same_backbone_whatever_the_head():
    weights = []
    for head_name in ("dense", "chunked"):
        backbone, features = build_backbone("small", 1, seed=7)
        network = attach_head(backbone, headzoo.create_head(head_name, features, 50))
        weights.append(torch.cat([p.flatten() for n, p in network.named_parameters() if "seg_layers" not in n]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


@pytest.mark.slow
def test_partial_labels_travel_from_loader_to_mask_with_multitalent_sampling():
    prepared = prepare_toy("tiny", 7, 0, sources=2)
    info = prepared.dataset_json["headzoo"]
    probabilities = prepared.sampling_probabilities()
    sizes = {s: list(info["case_sources"].values()).count(s) for s in (0, 1)}
    for key, p in zip(prepared.train_identifiers(), probabilities):
        assert abs(p * sum(n**0.5 for n in sizes.values()) - sizes[info["case_sources"][key]] ** -0.5) < 1e-12
    batch = next(training_batches(prepared, (16, 16, 16), 2, seed=0))
    mask = batch["annotated"]
    for row, key in enumerate(batch["keys"]):
        present = set(batch["target"][row].unique().tolist()) - {0}
        assert all(mask[row, c] for c in present) and mask[row, 0]
        assert mask[row].sum() == 1 + len(info["source_classes"][info["case_sources"][key]])


HEAVY = ("stu-l", "stu-h")  # 440 M and 1.46 B parameters: tests/test_stunet.py trains them at 32³


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in BACKBONES if n not in HEAVY])
def test_every_backbone_preset_builds_and_keeps_full_resolution(name):
    _, default_patch = BACKBONES[name]
    edge = min(default_patch, 64)  # the smallest patch each preset accepts is 2 × its downsampling
    check_patch(name, (edge,) * 3)
    backbone, features = build_backbone(name, 1, seed=0)
    with torch.no_grad():
        assert backbone(torch.randn(1, 1, edge, edge, edge)).shape == (1, features, edge, edge, edge)


def test_patch_checks_follow_the_strides():
    with pytest.raises(HeadzooError, match="too small"):
        check_patch("resenc-m", (32, 32, 32))
    check_patch("stu-s", (32, 32, 32))  # 3 downsamplings at its CPU patch
    with pytest.raises(HeadzooError, match="must be divisible by 32"):
        check_patch("stu-b", (48, 48, 48))


@pytest.mark.slow
def test_the_plan_is_the_truth():
    """Editing the frozen plan's configuration changes the network and the default patch; a plan
    frozen before a backbone existed gains its configuration without losing the user's edits."""
    prepared = prepare_toy("tiny", 3, 0)
    original = prepared.plans_file.read_text()
    plans = json.loads(original)
    stu_s = plans["configurations"][configuration_name("stu-s")]
    stu_s["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64, 96, 96]
    stu_s["architecture"]["arch_kwargs"]["n_blocks_per_stage"] = [1, 1, 1, 1, 1, 2]
    stu_s["patch_size"] = [16, 16, 16]
    del plans["configurations"][configuration_name("stu-b")]
    try:
        prepared.plans_file.write_text(json.dumps(plans))
        edited = prepare_toy("tiny", 3, 0)
        backbone, features = build_backbone_from_plan(edited, "stu-s", seed=0)
        assert features == 8 and edited.patch_size("stu-s") == (16, 16, 16)
        assert [stage[0].conv1.out_channels for stage in backbone.conv_blocks_context] == [8, 16, 32, 64, 96, 96]
        assert len(backbone.conv_blocks_context[-1]) == 2
        assert edited.architecture("stu-b") == json.loads(json.dumps(BACKBONES["stu-b"][0]))  # added back
    finally:
        prepared.plans_file.write_text(original)
    table, _ = build_backbone("stu-s", 1, seed=0)
    assert [stage[0].conv1.out_channels for stage in table.conv_blocks_context] == [16, 32, 64, 128, 256, 256]
