import numpy as np
import torch

import headzoo
from headzoo.inference import DiceCounter, class_counts, sliding_window_output


def test_sliding_window_average_of_a_pointwise_network_is_its_whole_volume_output():
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 3, 1)
    image = torch.randn(1, 32, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(sliding_window_output(network, image, (16, 16, 16)), network(image[None])[0])


def test_averaging_the_basis_then_projecting_equals_averaging_logits():
    """Why the chunked head may average R channels: logits are linear in the basis."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU())
    head = headzoo.create_head("chunked", 4, 40, rank=5, chunk=7)
    image = torch.randn(1, 24, 24, 24)
    with torch.no_grad():
        basis = sliding_window_output(torch.nn.Sequential(backbone, head), image, (16, 16, 16))
        logits = sliding_window_output(torch.nn.Sequential(backbone, head, LogitsOf(head)), image, (16, 16, 16))
    torch.testing.assert_close(head.logits(basis[None], slice(None))[0], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.predict(basis[None])[0], logits.argmax(0))


class LogitsOf(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, basis):
        return self.head.logits(basis, slice(None))


def test_pooled_dice_from_counts_equals_per_class_formula_over_all_voxels():
    rng = np.random.default_rng(0)
    truth, prediction = rng.integers(0, 6, (2, 10, 10, 10))
    truth[truth == 4] = 0  # class 4 absent from the reference (but predicted)
    counter = DiceCounter(6)
    counter.update(prediction[:5], truth[:5])
    counter.update(prediction[5:], truth[5:])
    expected = [
        2 * ((prediction == c) & (truth == c)).sum() / ((prediction == c).sum() + (truth == c).sum())
        for c in (1, 2, 3, 5)
    ]
    np.testing.assert_allclose(counter.pooled_per_class()[[1, 2, 3, 5]], expected)
    assert np.isnan(counter.pooled_per_class()[0]) and counter.pooled_per_class()[4] == 0  # a false positive
    np.testing.assert_allclose(counter.pooled_mean(), np.mean([*expected, 0.0]))
    per_case = [
        [2 * ((p == c) & (t == c)).sum() / ((p == c).sum() + (t == c).sum()) for c in (1, 2, 3, 5)]
        for p, t in ((prediction[:5], truth[:5]), (prediction[5:], truth[5:]))
    ]
    np.testing.assert_allclose(counter.per_class()[[1, 2, 3, 5]], np.mean(per_case, axis=0))


def test_class_counts_match_nnunet_one_hot_counts():
    """The counts of a run's Dice and of the trainers' validation pseudo Dice, against nnU-Net's get_tp_fp_fn_tn on
    one-hot maps (ignore label masked)."""
    from nnunetv2.training.loss.dice import get_tp_fp_fn_tn

    generator = torch.Generator().manual_seed(0)
    prediction = torch.randint(0, 6, (2, 5, 6, 7), generator=generator)
    target = torch.randint(0, 7, (2, 5, 6, 7), generator=generator)  # 6 is the ignore label
    mask = (target != 6).float()[:, None]

    def one_hot(x):
        return torch.nn.functional.one_hot(x.clamp(max=5), 6).movedim(-1, 1).float()

    tp, fp, fn, _ = get_tp_fp_fn_tn(one_hot(prediction), target[:, None].clamp(max=5), axes=[0, 2, 3, 4], mask=mask)
    reference = torch.stack([tp, fp, fn]).numpy().astype(np.int64)
    np.testing.assert_array_equal(class_counts(prediction, target, 6, ignore_label=6), reference)
    counter = DiceCounter(6, ignore_label=6)  # a run's counter: numpy maps of any integer type
    counter.update(prediction.numpy().astype(np.uint8), target.numpy().astype(np.int16))
    np.testing.assert_array_equal(counter._counts[0], reference)
