"""The chunked loss is exact: nnU-Net's loss at float32 tolerance, a float64 restatement at ~1e-12."""

import pytest
import torch

import headzoo
from headzoo.heads.chunked import chunked_argmax, chunked_dc_and_ce_loss
from headzoo.heads.dense import build_nnunet_loss
from reference import reference_dc_and_ce


def _problem(b, num_classes, rank=5, spatial=(5, 4, 3), dtype=torch.float64, absent=0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(b, rank, *spatial, dtype=dtype, generator=generator).requires_grad_()
    operator = torch.randn(rank, num_classes, dtype=dtype, generator=generator).requires_grad_()
    target = torch.randint(0, num_classes - absent, (b, 1, *spatial), generator=generator)
    return basis, operator, target


def _logits(basis, operator):
    return torch.einsum("br...,rc->bc...", basis, operator)


CASES = [  # (b, C, chunk, batch_dice, absent classes)
    (1, 13, 4, True, 0),
    (2, 13, 4, True, 5),
    (2, 13, 4, False, 0),
    (1, 10, 3, False, 4),
    (2, 7, 30, True, 2),
]


@pytest.mark.parametrize("b,num_classes,chunk,batch_dice,absent", CASES)
def test_matches_float64_restatement_to_1e12(b, num_classes, chunk, batch_dice, absent):
    basis, operator, target = _problem(b, num_classes, absent=absent)
    loss = chunked_dc_and_ce_loss(basis, operator, target, chunk, batch_dice=batch_dice)
    grads = torch.autograd.grad(loss, (basis, operator))
    reference = reference_dc_and_ce(_logits(basis, operator), target, batch_dice)
    expected = torch.autograd.grad(reference, (basis, operator))
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("b,num_classes,chunk,batch_dice,absent", CASES)
def test_matches_nnunet_loss_at_float32(b, num_classes, chunk, batch_dice, absent):
    basis, operator, target = _problem(b, num_classes, dtype=torch.float32, absent=absent)
    loss = chunked_dc_and_ce_loss(basis, operator, target, chunk, batch_dice=batch_dice)
    grads = torch.autograd.grad(loss, (basis, operator))
    nnunet = build_nnunet_loss(batch_dice=batch_dice)(_logits(basis, operator), target)
    expected = torch.autograd.grad(nnunet, (basis, operator))
    torch.testing.assert_close(loss, nnunet, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_ignore_label_and_loss_options(batch_dice):
    basis, operator, target = _problem(2, 9)
    target[0, 0, :2] = 9  # the ignore label (= C, as nnU-Net numbers it)
    options = dict(batch_dice=batch_dice, do_bg=True, smooth=0.5, weight_ce=0.7, weight_dice=1.3, ignore_label=9)
    loss = chunked_dc_and_ce_loss(basis, operator, target, 4, **options)
    reference = reference_dc_and_ce(_logits(basis, operator), target, **options)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-12)
    for got, want in zip(
        torch.autograd.grad(loss, (basis, operator)), torch.autograd.grad(reference, (basis, operator))
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradients_reach_features_through_the_basis_conv():
    torch.manual_seed(0)
    head = headzoo.create_head("chunked", 6, 23, batch_dice=True, rank=4, chunk=7).double()
    features = torch.randn(2, 6, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 23, (2, 1, 4, 4, 3))
    loss = head.loss(head(features), target)
    got = torch.autograd.grad(loss, [features, *head.parameters()])
    reference = reference_dc_and_ce(head.logits(head(features), slice(None)), target, batch_dice=True)
    want = torch.autograd.grad(reference, [features, *head.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    basis, operator, target = _problem(1, 6, rank=3, spatial=(3, 2, 2))
    torch.autograd.gradcheck(lambda b, e: chunked_dc_and_ce_loss(b, e, target, 4, batch_dice=False), (basis, operator))


@pytest.mark.parametrize("chunk", [1, 7, 30, 1000])
def test_predict_is_argmax_of_materialised_logits(chunk):
    basis, operator, _ = _problem(2, 57, rank=8, spatial=(6, 5, 4), dtype=torch.float32)
    with torch.no_grad():
        expected = _logits(basis, operator).argmax(1)
        torch.testing.assert_close(chunked_argmax(basis, operator, chunk), expected)


def test_rank_above_class_count_is_rejected():
    with pytest.raises(headzoo.HeadzooError, match="rank must be in"):
        headzoo.create_head("chunked", 4, 10, rank=11)


@pytest.mark.slow
def test_never_holds_a_b_by_c_by_s_tensor():
    """Peak live tensor bytes of forward + backward stay far below one b×C×S float tensor."""
    from torch.distributed._tools.mem_tracker import MemTracker

    b, num_classes, spatial = 2, 2000, (16, 16, 16)
    basis, operator, target = _problem(b, num_classes, rank=8, spatial=spatial, dtype=torch.float32)
    tracker = MemTracker()
    tracker.track_external(basis, operator)
    with tracker:
        chunked_dc_and_ce_loss(basis, operator, target, 30).backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    one_logit_tensor = b * num_classes * 16**3 * 4
    assert peak < one_logit_tensor / 10
