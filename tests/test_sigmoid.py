"""The sigmoid head's loss is MultiTalent's eq. (2), checked against a literal float64 statement."""

import pytest
import torch

import headzoo
from headzoo.heads.sigmoid import sigmoid_class_loss


def reference_eq2(logits, target, annotated):
    """Literal loops over classes and samples, float64: logits (b, C−1, S), target (b, S), annotated (b, C)."""
    logits = logits.double()
    total = torch.zeros((), dtype=torch.float64)
    for c in range(1, annotated.shape[1]):
        intersect = torch.zeros((), dtype=torch.float64)
        denominator = torch.zeros((), dtype=torch.float64)
        for b in range(logits.shape[0]):
            if not annotated[b, c]:
                continue
            s, y = logits[b, c - 1], (target[b] == c).double()
            p = torch.sigmoid(s)
            total = total + torch.mean(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)))
            intersect = intersect + (p * y).sum()
            denominator = denominator + (p + y).sum()
        total = total - 2 * intersect / torch.clamp(denominator, min=1e-7)
    return total


def _problem(b=2, num_classes=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, num_classes - 1, 4, 3, 3, dtype=torch.float64, generator=generator).requires_grad_()
    target = torch.randint(0, num_classes, (b, 1, 4, 3, 3), generator=generator)
    annotated = torch.rand(b, num_classes, generator=generator) > 0.4
    return logits, target, annotated


@pytest.mark.parametrize("seed", range(4))
def test_loss_and_gradients_equal_eq2(seed):
    logits, target, annotated = _problem(seed=seed)
    head = headzoo.create_head("sigmoid", 3, 8)
    loss = head.loss(logits, target, annotated)
    reference = reference_eq2(logits.flatten(2), target.flatten(1), annotated)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(loss, logits)[0], torch.autograd.grad(reference, logits)[0], rtol=1e-10, atol=1e-12
    )


def test_unannotated_class_relabelled_as_background_changes_nothing():
    logits, target, annotated = _problem(seed=5)
    annotated[0, 3] = False
    relabelled = target.clone()
    relabelled[0][relabelled[0] == 3] = 0
    assert (target[0] == 3).any()
    head = headzoo.create_head("sigmoid", 3, 8)
    torch.testing.assert_close(
        head.loss(logits, target, annotated), head.loss(logits, relabelled, annotated), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("chunk", [1, 3, 30])
def test_chunked_variant_equals_full_on_the_same_logits(chunk):
    torch.manual_seed(0)
    head = headzoo.create_head("sigmoid", 5, 12, rank=4, chunk=chunk).double()
    basis = torch.randn(2, 4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 12, (2, 1, 4, 3, 3))
    annotated = torch.rand(2, 12) > 0.3
    loss = head.loss(basis, target, annotated)
    full_logits = head.logits(basis, slice(1, 12))
    full = sigmoid_class_loss(
        full_logits.flatten(2), torch.arange(1, 12), target.flatten(1).long(), annotated[:, 1:].double()
    )
    torch.testing.assert_close(loss, full, rtol=0, atol=1e-12)
    parameters = [basis, head.operator, head.class_bias]
    for got, want in zip(torch.autograd.grad(loss, parameters), torch.autograd.grad(full, parameters)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        probabilities = torch.sigmoid(full_logits)
        best, index = probabilities.max(1)
        expected = torch.where(best > 0.5, index + 1, 0)
        torch.testing.assert_close(head.predict(basis), expected)


@pytest.mark.parametrize("options", [{}, {"rank": 4, "chunk": 3}])
def test_prior_starts_every_class_at_its_probability(options):
    """prior=π: with zero features every foreground sigmoid is π (Lin et al.'s prior initialisation)."""
    head = headzoo.create_head("sigmoid", 6, 9, prior=0.01, **options)
    logits = head.logits(head(torch.zeros(1, 6, 2, 2, 2)), slice(1, 9))
    assert torch.allclose(torch.sigmoid(logits.double()), torch.full_like(logits.double(), 0.01), atol=1e-7)
    assert (head.predict(head(torch.zeros(1, 6, 2, 2, 2))) == 0).all()


@pytest.mark.parametrize("prior", [0, 1, -0.5, 2])
def test_prior_outside_the_unit_interval_is_refused(prior):
    with pytest.raises(headzoo.HeadzooError, match=r"prior must be in \(0, 1\)"):
        headzoo.create_head("sigmoid", 6, 9, prior=prior)
