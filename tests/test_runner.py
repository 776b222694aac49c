"""The run's training loop in-process, on small tensors (no nnU-Net preprocessing): the batches and held-out
cases are given to `train_and_evaluate`, as `headzoo run` gives it nnU-Net's. The held-out cases are made as
nnU-Net's predictor preprocesses a case (axes transposed by the plan, cropped to a box) and evaluated through
nnU-Net's export back to the original geometry."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import headzoo
from headzoo.backbone import head_of
from networks import ConvThenHead
from headzoo.config import RunConfig
from headzoo.dataset import HeldOutCase, HeldOutSet
from headzoo.results import validate_row
from headzoo.training import build_optimizer, train_and_evaluate

C = 4
PATCH = (8, 8, 8)
TRANSPOSE_FORWARD, TRANSPOSE_BACKWARD = [2, 0, 1], [1, 2, 0]


def _plans_manager():
    """A plan with what nnU-Net's export reads: the axes' transposition, the data configuration's spacing and
    resampling of the network's output (as the toy's plan has them), the label manager."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resampling = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return PlansManager(
        {
            "transpose_forward": TRANSPOSE_FORWARD,
            "transpose_backward": TRANSPOSE_BACKWARD,
            "label_manager": "LabelManager",
            "configurations": {
                "3d_fullres": {
                    "spacing": [1.0, 1.0, 1.0],
                    "architecture": {},
                    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                    "resampling_fn_probabilities_kwargs": resampling,
                }
            },
        }
    )


def _case(key: str, reference: np.ndarray) -> HeldOutCase:
    """`reference` (original geometry, labels inside a one-voxel border) as nnU-Net's predictor gives the case:
    axes transposed, cropped to the non-zero box, here one channel per class (the label's one-hot)."""
    transposed = reference.transpose(TRANSPOSE_FORWARD)
    box = [[1, edge - 1] for edge in transposed.shape]
    cropped = transposed[tuple(slice(low, high) for low, high in box)]
    image = nn.functional.one_hot(torch.from_numpy(cropped), C).permute(3, 0, 1, 2).float()
    properties = {
        "spacing": [1.0, 1.0, 1.0],
        "shape_before_cropping": list(transposed.shape),
        "bbox_used_for_cropping": box,
        "shape_after_cropping_and_before_resampling": list(cropped.shape),
    }
    return HeldOutCase(key, image, properties, reference)


def _references() -> list[np.ndarray]:
    """Two cases of shape 10×11×12 (asymmetric: a wrong transposition cannot pass), classes 1–3 in the first,
    1–2 in the second (class 3 is not scored there)."""
    generator = np.random.default_rng(0)
    references = []
    for classes in (3, 2):
        reference = np.zeros((10, 11, 12), dtype=np.int64)
        reference[1:-1, 1:-1, 1:-1] = generator.integers(0, classes + 1, (8, 9, 10))
        references.append(reference)
    return references


class _CountedCases:
    """Held-out cases that count how often they are read."""

    def __init__(self, cases: list[HeldOutCase]):
        self.cases, self.passes = cases, 0

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self):
        self.passes += 1
        return iter(self.cases)


def _held_out() -> HeldOutSet:
    dataset_json = {"labels": {"background": 0, "a": 1, "b": 2, "c": 3}, "file_ending": ".nii.gz"}
    cases = _CountedCases([_case(f"case_{i}", r) for i, r in enumerate(_references())])
    plans_manager = _plans_manager()
    return HeldOutSet(cases, plans_manager, plans_manager.get_configuration("3d_fullres"), dataset_json)


def _batches(count: int, annotated: torch.Tensor | None = None) -> list[dict]:
    """`count` batches of two patches: labels, and their one-hot image with noise."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        target = torch.randint(0, C, (2, 1, *PATCH), generator=generator)
        data = nn.functional.one_hot(target[:, 0], C).permute(0, 4, 1, 2, 3).float()
        batches.append(
            {
                "data": data + 0.5 * torch.randn(data.shape, generator=generator),
                "target": target,
                "annotated": annotated,
            }
        )
    return batches


def _network(head: str = "dense", class_of_channel: list[int] | None = None) -> ConvThenHead:
    """A 1×1×1 conv backbone and `head`; with `class_of_channel`, weights that predict class_of_channel[c] from
    a one-hot channel c (identity backbone, dense head with weight 10 from channel c to that class)."""
    torch.manual_seed(0)
    network = ConvThenHead(
        nn.Conv3d(C, 8 if class_of_channel is None else C, 1),
        headzoo.create_head(head, 8 if class_of_channel is None else C, C),
    )
    if class_of_channel is not None:
        with torch.no_grad():
            network.conv.weight.copy_(torch.eye(C)[..., None, None, None])
            head_of(network).conv.weight.copy_(10 * torch.eye(C)[class_of_channel][..., None, None, None])
            network.conv.bias.zero_()
            head_of(network).conv.bias.zero_()
    return network


def _train(network, batches, held_out, **settings) -> dict:
    config = RunConfig(**{"head": "dense", "classes": C, "patch": PATCH, "device": "cpu", **settings})
    return train_and_evaluate(config, network, torch.device("cpu"), batches, held_out, False)


def test_a_perfect_predictor_scores_one_at_every_point_of_the_curve():
    """lr 0: the weights stay those that predict each voxel's class from its one-hot image."""
    held_out, batches = _held_out(), iter(_batches(8))
    record = _train(_network(class_of_channel=[0, 1, 2, 3]), batches, held_out, steps=7, warmup=1, eval_every=3, lr=0.0)
    assert [point["step"] for point in record["curve"]] == [3, 6, 7]
    assert held_out.cases.passes == 3  # one pass over the cases per point, the last the final evaluation
    assert [(p["dice_mean"], p["dice_worst10_mean"]) for p in record["curve"]] == [(1.0, 1.0)] * 3
    assert (record["dice_mean"], record["dice_pooled_mean"], record["dice_classes_present"]) == (1.0, 1.0, 3)
    assert len(list(batches)) == 1  # exactly `steps` batches taken


def test_a_curve_whose_last_point_falls_on_the_last_step_has_it_once():
    held_out = _held_out()
    record = _train(_network(), iter(_batches(6)), held_out, steps=6, warmup=1, eval_every=3)
    assert [point["step"] for point in record["curve"]] == [3, 6] and held_out.cases.passes == 2
    assert record["curve"][-1]["dice_mean"] == record["dice_mean"]


def test_dice_is_nnunets_per_case_mean_on_swapped_classes():
    """Classes 1 and 2 predicted as each other: their Dice is 0 in every case; class 3 is right in the one case
    that has it and scored nowhere else (nnU-Net's per-class mean over the cases that score it)."""
    record = _train(_network(class_of_channel=[0, 2, 1, 3]), iter(_batches(4)), _held_out(), steps=4, warmup=1, lr=0.0)
    assert record["dice_mean"] == pytest.approx(1 / 3, abs=1e-12)
    assert record["dice_worst10_mean"] == 0.0 and record["dice_classes_present"] == 3
    assert record["dice_pooled_mean"] == pytest.approx(1 / 3, abs=1e-12) and record["curve"] is None


def test_the_loop_trains_as_a_plain_loop_and_records_its_measurements():
    """Losses as a plain loop of nnU-Net's train step over the same batches gives them (forward, loss, backward,
    clipping at 12, ScheduleFree step); a memory step after warm-up, the rest timed; a valid record."""
    steps, warmup = 12, 2
    network, batches = _network(), _batches(steps)
    reference = copy.deepcopy(network)
    optimizer = build_optimizer(reference, steps, 0.0025)
    reference.train()
    optimizer.train()
    losses = []
    for batch in batches:
        loss = head_of(reference).loss(reference(batch["data"]), batch["target"])
        loss.backward()
        nn.utils.clip_grad_norm_(reference.parameters(), 12)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    record = _train(network, iter(batches), _held_out(), steps=steps, warmup=warmup, grad_clip=12.0)
    assert record["loss_first"] == losses[0] and record["loss_last"] == pytest.approx(np.mean(losses[-10:]), abs=0)
    assert (record["memory_step"], record["memory_step_optimizer_state_complete"]) == (warmup, True)
    assert record["timed_steps"] == steps - warmup - 1
    assert record["peak_memory_kind"] == "cpu_live_tensors" and record["peak_memory_bytes"] > 0
    assert record["dice_definition"] == "nnunet" and "status" not in record
    for a, b in zip(reference.parameters(), network.parameters()):  # back at the training weights after evaluation
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    validate_row({"head": "dense", "status": "ok", **record}, "the record")


def test_each_batch_brings_its_annotated_classes_to_the_loss():
    annotated = torch.tensor([[True, True, False, True], [True, False, True, False]])
    network, seen = _network("sigmoid"), []
    loss = head_of(network).loss
    head_of(network).loss = lambda output, target, mask: seen.append(mask) or loss(output, target, mask)
    _train(network, iter(_batches(4, annotated)), _held_out(), head="sigmoid", steps=4, warmup=1)
    assert len(seen) == 4 and all(mask is annotated for mask in seen)
