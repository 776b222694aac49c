"""Every registered head, plug-ins included, against the same contract (DESIGN.md)."""
import pytest
import torch

import headzoo
from headzoo.errors import HeadzooError

C, F, B, SPATIAL = 9, 6, 2, (6, 5, 4)


# every registered head with its defaults, plus the variants that take another code path
VARIANTS = [(name, {}) for name in headzoo.list_heads()] + [
    ("chunked", {"rank": 3, "chunk": 4}), ("sigmoid", {"rank": 4, "chunk": 3}), ("knn", {"knn_backend": "torch"})]


@pytest.fixture(params=VARIANTS, ids=lambda v: v[0] + "".join(f"-{k}={x}" for k, x in v[1].items()))
def head(request):
    torch.manual_seed(0)
    name, options = request.param
    return headzoo.create_head(name, F, C, **options)


def _batch():
    torch.manual_seed(1)
    features = torch.randn(B, F, *SPATIAL, requires_grad=True)
    target = torch.randint(0, C, (B, 1, *SPATIAL))
    return features, target


def test_output_shape(head):
    features, _ = _batch()
    output = head(features)
    assert output.shape[0] == B and output.shape[2:] == SPATIAL
    assert 1 <= output.shape[1] <= C


def test_loss_is_finite_and_differentiable(head):
    features, target = _batch()
    loss = head.loss(head(features), target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters() if p.requires_grad)


def test_predict(head):
    features, _ = _batch()
    with torch.no_grad():
        prediction = head.predict(head(features))
    assert prediction.dtype == torch.long and prediction.shape == (B, *SPATIAL)
    assert 0 <= int(prediction.min()) and int(prediction.max()) < C


def test_logits_shape(head):
    features, _ = _batch()
    with torch.no_grad():
        assert head.logits(head(features), slice(2, 7)).shape == (B, 5, *SPATIAL)


@pytest.mark.parametrize("bad", [-1, C])
def test_labels_outside_range_are_rejected(head, bad):
    features, target = _batch()
    target[0, 0, 0, 0, 0] = bad
    with pytest.raises(HeadzooError, match=f"label {bad} is outside"):
        head.loss(head(features), target)


def test_wrong_target_shape_is_rejected(head):
    features, target = _batch()
    with pytest.raises(HeadzooError, match="target must have shape"):
        head.loss(head(features), target[:, :, :-1])


def test_annotated_only_where_supported(head):
    features, target = _batch()
    annotated = torch.ones(B, C, dtype=torch.bool)
    if head.accepts_annotated:
        assert torch.isfinite(head.loss(head(features), target, annotated))
    else:
        with pytest.raises(HeadzooError, match="cannot use partial labels"):
            head.loss(head(features), target, annotated)
