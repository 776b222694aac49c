"""The conformance checks can fail: each one, run on a deliberately broken head, says what broke."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import contract
from headzoo_dummy_head import DummyHead  # tests/plugin_dist, installed by conftest

C = 9


class GoodHead(DummyHead):
    """The plug-in example head (full logits, cross-entropy): passes every check."""

    def __init__(self, in_channels=contract.F, num_classes=C, **plan_options):
        super().__init__(in_channels, num_classes, **plan_options)


class PredictsArgmin(GoodHead):
    def predict(self, output):
        return output.argmin(1)


class UnusedParameter(GoodHead):
    def __init__(self):
        super().__init__()
        self.forgotten = nn.Parameter(torch.zeros(3))


class ForeignParamGroup(GoodHead):
    def configure_optimizer(self, lr, betas, weight_decay):
        return [{"params": [nn.Parameter(torch.zeros(1))], "weight_decay": weight_decay}]


class UnstatedWeightDecay(GoodHead):
    def configure_optimizer(self, lr, betas, weight_decay):
        return [{"params": list(self.parameters())}]


class IgnoresAnnotated(GoodHead):
    """Claims to take the annotated mask, but every class still counts."""

    accepts_annotated = True


class MaterialisesAllLogits(GoodHead):
    """K < C output, but the loss expands it to all C logits."""

    def __init__(self, num_classes=2000):
        super().__init__(num_classes=num_classes)
        self.conv = nn.Conv3d(contract.F, 4, 1)
        self.operator = nn.Parameter(torch.randn(4, num_classes))

    def logits(self, output, classes):
        return torch.einsum("br...,rc->bc...", output, self.operator[:, classes])

    def loss(self, output, target, annotated=None):
        return F.cross_entropy(self.logits(output, slice(None)), target[:, 0].long())


def test_the_good_head_passes_every_check():
    head = GoodHead()
    contract.check_predict_is_argmax_of_logits(head)
    contract.check_every_parameter_gets_a_gradient(head)
    contract.check_param_groups_hold_only_own_parameters(head)
    contract.check_unannotated_class_contributes_nothing(head)


@pytest.mark.parametrize(
    "head,check,message",
    [
        (PredictsArgmin(), contract.check_predict_is_argmax_of_logits, "predict disagrees with the argmax"),
        (UnusedParameter(), contract.check_every_parameter_gets_a_gradient, "parameter 'forgotten' gets no gradient"),
        (ForeignParamGroup(), contract.check_param_groups_hold_only_own_parameters, "not the head's"),
        (
            UnstatedWeightDecay(),
            contract.check_param_groups_hold_only_own_parameters,
            "does not state its weight_decay",
        ),
        (IgnoresAnnotated(), contract.check_unannotated_class_contributes_nothing, "still changes the loss"),
    ],
    ids=["predict", "gradient", "param_groups", "weight_decay", "annotated"],
)
def test_each_check_fails_for_its_broken_head(head, check, message):
    with pytest.raises(AssertionError, match=message):
        check(head)


@pytest.mark.slow  # MemTracker over C = 2000
def test_memory_check_fails_for_a_head_that_materialises_all_logits():
    with pytest.raises(AssertionError, match="over a tenth of what one b×C×S logit tensor adds"):
        contract.check_compact_head_memory(lambda c: MaterialisesAllLogits(c), contract.F, (16, 16, 16))
