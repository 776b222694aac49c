import pytest
import torch

import headzoo
from headzoo.backbone import SegmentationNetwork, build_backbone, check_patch
from headzoo.errors import HeadzooError
from headzoo.pipeline import configuration_name, prepare_toy, training_loader


@pytest.mark.slow
def test_one_frozen_plan_for_every_class_count():
    few, many = prepare_toy("tiny", 3, 0), prepare_toy("tiny", 40, 0)
    for backbone in ("small", "resenc-m", "resenc-l"):
        a, b = few.configuration(backbone), many.configuration(backbone)
        assert a.patch_size == b.patch_size and a.network_arch_init_kwargs == b.network_arch_init_kwargs
        assert a.batch_size == b.batch_size and a.spacing == b.spacing
    assert few.plans["configurations"][configuration_name("small")]["patch_size"] == [32, 32, 32]


@pytest.mark.slow
def test_loader_is_deterministic_and_yields_nnunet_batches():
    prepared = prepare_toy("tiny", 5, 0)
    first = next(training_loader(prepared, (16, 16, 16), 2, seed=4))
    second = next(training_loader(prepared, (16, 16, 16), 2, seed=4))
    assert first["data"].shape == (2, 1, 16, 16, 16) and first["target"].shape == (2, 1, 16, 16, 16)
    torch.testing.assert_close(first["data"], second["data"])
    torch.testing.assert_close(first["target"], second["target"])


def test_same_seed_same_backbone_whatever_the_head():
    weights = []
    for head_name in ("dense", "chunked"):
        backbone, features = build_backbone("small", 1, seed=7)
        network = SegmentationNetwork(backbone, headzoo.create_head(head_name, features, 50))
        weights.append(torch.cat([p.flatten() for p in network.backbone.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


@pytest.mark.slow
def test_partial_labels_travel_from_loader_to_mask_with_multitalent_sampling():
    prepared = prepare_toy("tiny", 7, 0, sources=2)
    info = prepared.dataset_json["headzoo"]
    probabilities = prepared.sampling_probabilities()
    sizes = {s: list(info["case_sources"].values()).count(s) for s in (0, 1)}
    for key, p in zip(prepared.train_identifiers(), probabilities):
        assert abs(p * sum(n ** 0.5 for n in sizes.values()) - sizes[info["case_sources"][key]] ** -0.5) < 1e-12
    batch = next(training_loader(prepared, (16, 16, 16), 2, seed=0))
    mask = prepared.annotated_mask(batch["keys"])
    for row, key in enumerate(batch["keys"]):
        present = set(batch["target"][row].unique().tolist()) - {0}
        assert all(mask[row, c] for c in present) and mask[row, 0]
        assert mask[row].sum() == 1 + len(info["source_classes"][info["case_sources"][key]])


@pytest.mark.slow
def test_every_backbone_preset_builds_and_keeps_full_resolution():
    from headzoo.backbone import BACKBONES
    for name, (_, default_patch) in BACKBONES.items():
        edge = min(default_patch, 64)  # the smallest patch each preset accepts is 2 × its downsampling
        check_patch(name, (edge,) * 3)
        backbone, features = build_backbone(name, 1, seed=0)
        with torch.no_grad():
            assert backbone(torch.randn(1, 1, edge, edge, edge)).shape == (1, features, edge, edge, edge)
    with pytest.raises(HeadzooError, match="too small"):
        check_patch("resenc-m", (32, 32, 32))
