"""Every registered head, plug-ins included, and every variant a head declares (``Head.variants``),
against the same executable contract (tests/contract.py)."""

import pytest
import torch

import headzoo
from headzoo.errors import HeadzooError
from headzoo.registry import get_head_class

import contract
from contract import B, F, SPATIAL, batch

C = 9
VARIANTS = [(name, options) for name in headzoo.list_heads() for options in ({}, *get_head_class(name).variants)]


def _id(variant):
    name, options = variant
    return name + "".join(f"-{k}={x}" for k, x in options.items())


@pytest.fixture(params=VARIANTS, ids=_id)
def variant(request):
    return request.param


@pytest.fixture
def head(variant):
    torch.manual_seed(0)
    name, options = variant
    return headzoo.create_head(name, F, C, **options)


def test_output_shape(head):
    features, _ = batch(C)
    output = head(features)
    assert output.shape[0] == B and output.shape[2:] == SPATIAL
    assert 1 <= output.shape[1] <= C


def test_every_parameter_gets_a_gradient(head):
    contract.check_every_parameter_gets_a_gradient(head)


def test_predict_is_argmax_of_logits(head):
    features, _ = batch(C)
    with torch.no_grad():
        prediction = head.predict(head(features))
    assert prediction.dtype == torch.long and prediction.shape == (B, *SPATIAL)
    assert 0 <= int(prediction.min()) and int(prediction.max()) < C
    contract.check_predict_is_argmax_of_logits(head)


def test_param_groups_hold_only_own_parameters(head):
    contract.check_param_groups_hold_only_own_parameters(head)


def test_unannotated_class_contributes_nothing(head):
    contract.check_unannotated_class_contributes_nothing(head)


def test_logits_shape(head):
    features, _ = batch(C)
    with torch.no_grad():
        assert head.logits(head(features), slice(2, 7)).shape == (B, 5, *SPATIAL)


def _check_compact_head_memory(name: str, options: dict) -> None:
    head = headzoo.create_head(name, F, 2000, **options)
    features, _ = batch(2000)
    if head(features).shape[1] * 10 >= head.num_classes:
        pytest.skip("not a compact head (K ≥ C/10)")
    contract.check_compact_head_memory(lambda c: headzoo.create_head(name, F, c, **options), F, (16, 16, 16))


# every variant with the head's own chunk size (seconds); the variants' tiny chunks (hundreds of chunks at
# C=2000, tens of seconds each) in the slow suite
WITHOUT_CHUNK = [(name, {k: x for k, x in options.items() if k != "chunk"}) for name, options in VARIANTS]
DEFAULT_CHUNK_VARIANTS = list({_id(variant): variant for variant in WITHOUT_CHUNK}.values())


@pytest.mark.parametrize("name_and_options", DEFAULT_CHUNK_VARIANTS, ids=_id)
def test_compact_heads_never_hold_b_by_c_by_s(name_and_options):
    _check_compact_head_memory(*name_and_options)


@pytest.mark.slow
@pytest.mark.parametrize("name_and_options", [v for v in VARIANTS if "chunk" in v[1]], ids=_id)
def test_compact_heads_never_hold_b_by_c_by_s_in_tiny_chunks(name_and_options):
    _check_compact_head_memory(*name_and_options)


@pytest.mark.parametrize("bad", [-1, C])
def test_labels_outside_range_are_rejected(head, bad):
    features, target = batch(C)
    target[0, 0, 0, 0, 0] = bad
    with pytest.raises(HeadzooError, match=f"label {bad} is outside"):
        head.loss(head(features), target)


def test_wrong_target_shape_is_rejected(head):
    features, target = batch(C)
    with pytest.raises(HeadzooError, match="target must have shape"):
        head.loss(head(features), target[:, :, :-1])


def test_annotated_only_where_supported(head):
    features, target = batch(C)
    annotated = torch.ones(B, C, dtype=torch.bool)
    if head.accepts_annotated:
        assert torch.isfinite(head.loss(head(features), target, annotated))
    else:
        with pytest.raises(HeadzooError, match="cannot use partial labels"):
            head.loss(head(features), target, annotated)


def test_plan_options_are_accepted(variant):
    """The runner passes batch_dice and ignore_label to every head (head.PLAN_OPTIONS)."""
    name, options = variant
    head = headzoo.create_head(name, F, C, batch_dice=True, ignore_label=None, **options)
    assert head.batch_dice is True and head.ignore_label is None
