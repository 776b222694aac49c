"""The head contract (headzoo/head.py; the README's "Writing a head (plug-ins)") as executable checks.
test_conformance.py runs them over every registered head and its declared variants; test_contract.py shows
each one fails for a broken head.
A failed check says which head, and which parameter or class, broke which rule."""

from __future__ import annotations

import torch

from headzoo.head import Head

B, F, SPATIAL = 2, 6, (6, 5, 4)


def batch(num_classes: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(B, F, *SPATIAL, generator=generator, requires_grad=True)
    target = torch.randint(0, num_classes, (B, 1, *SPATIAL), generator=generator)
    return features, target


def all_logits(head: Head, output: torch.Tensor) -> torch.Tensor:
    return head.logits(output, slice(0, head.num_classes))


def check_predict_is_argmax_of_logits(head: Head) -> None:
    """`predict` is the argmax over every class's score from `logits` (ties aside)."""
    features, _ = batch(head.num_classes)
    with torch.no_grad():
        output = head(features)
        prediction = head.predict(output)
        logits = all_logits(head, output)
    expected = logits.argmax(1)
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5 * top2[:, 0].abs().clamp_min(1)  # not a numerical tie
    wrong = (prediction != expected) & clear
    assert not wrong.any(), (
        f"{type(head).__name__}: predict disagrees with the argmax of logits at "
        f"{int(wrong.sum())} of {wrong.numel()} voxels"
    )


def check_every_parameter_gets_a_gradient(head: Head) -> None:
    """One loss.backward() reaches every trainable parameter with a finite, non-zero gradient."""
    features, target = batch(head.num_classes)
    head.zero_grad(set_to_none=True)
    loss = head.loss(head(features), target)
    assert loss.ndim == 0 and torch.isfinite(loss), f"{type(head).__name__}: loss {loss} is not a finite scalar"
    loss.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0, (
        f"{type(head).__name__}: no finite gradient reaches the features"
    )
    for name, parameter in head.named_parameters():
        if parameter.requires_grad:
            grad = parameter.grad
            assert grad is not None, f"{type(head).__name__}: parameter '{name}' gets no gradient"
            assert torch.isfinite(grad).all(), f"{type(head).__name__}: parameter '{name}' has a non-finite gradient"
            assert grad.abs().sum() > 0, f"{type(head).__name__}: parameter '{name}' has an all-zero gradient"


def check_param_groups_hold_only_own_parameters(head: Head) -> None:
    """`configure_optimizer`'s groups (if any) list only this head's parameters, each once, and each group
    states its weight decay."""
    groups = head.configure_optimizer(lr=1e-3, betas=(0.9, 0.995), weight_decay=0.0812)
    if groups is None:
        return
    own = {id(p): n for n, p in head.named_parameters()}
    seen: set[int] = set()
    for group in groups:
        assert "weight_decay" in group, f"{type(head).__name__}: an optimizer group does not state its weight_decay"
        for parameter in group["params"]:
            assert id(parameter) in own, (
                f"{type(head).__name__}: configure_optimizer holds a parameter that is not the head's"
            )
            assert id(parameter) not in seen, (
                f"{type(head).__name__}: parameter '{own[id(parameter)]}' is in two groups"
            )
            seen.add(id(parameter))


def own_channels(head: Head, output: torch.Tensor) -> dict[int, int]:
    """class → the output channel that moves that class's logit and no other's (empty for compact heads)."""
    with torch.no_grad():
        base = all_logits(head, output)
        owners = {}
        for channel in range(output.shape[1]):
            bumped = output.clone()
            bumped[:, channel] += 1.0
            moved = (all_logits(head, bumped) - base).abs().flatten(2).amax((0, 2)) > 1e-6
            if int(moved.sum()) == 1:
                owners[int(moved.nonzero())] = channel
    return owners


def check_unannotated_class_contributes_nothing(head: Head) -> None:
    """With `annotated`, a class marked unannotated in a sample adds nothing to that sample's loss;
    annotated=None means every class is annotated."""
    if not head.accepts_annotated:
        return
    features, target = batch(head.num_classes)
    output = head(features).detach()
    annotated = torch.ones(B, head.num_classes, dtype=torch.bool)
    everything = head.loss(output, target, annotated)
    assert torch.allclose(head.loss(output, target, None), everything), (
        f"{type(head).__name__}: annotated=None differs from every class annotated"
    )
    owners = own_channels(head, output)
    if not owners:
        return  # compact output: no class has a channel of its own to move (its variants are checked by value)
    cls = max(owners)  # a foreground class with a channel of its own
    annotated[0, cls] = False
    moved = output.clone()
    moved[0, owners[cls]] += 3.0
    unchanged = head.loss(moved, target, annotated) - head.loss(output, target, annotated)
    assert abs(float(unchanged)) < 1e-5, (
        f"{type(head).__name__}: class {cls}, unannotated in sample 0, still changes the loss by {float(unchanged):.3g}"
    )
    changed = head.loss(moved, target, torch.ones_like(annotated)) - everything
    assert abs(float(changed)) > 1e-5, f"{type(head).__name__}: class {cls}'s channel does not reach the loss"


def training_step_peak_bytes(head: Head, num_features: int, spatial: tuple[int, ...]) -> int:
    """Peak live tensor bytes of the head's forward + loss + backward on fixed features (CPU, MemTracker)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(B, num_features, *spatial, generator=generator, requires_grad=True)
    target = torch.randint(0, head.num_classes, (B, 1, *spatial), generator=generator)
    tracker = MemTracker()
    tracker.track_external(head, features)
    with tracker:
        head.loss(head(features), target).backward()
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def check_compact_head_memory(
    make_head, num_features: int, spatial: tuple[int, ...], classes: tuple[int, int] = (200, 2000)
) -> None:
    """A head whose output has K < C channels never holds b×C×S: from C=200 to C=2000 its training step's peak
    grows by less than a tenth of what one float32 b×C×S logit tensor would add."""
    small, large = (training_step_peak_bytes(make_head(c), num_features, spatial) for c in classes)
    logit_growth = B * (classes[1] - classes[0]) * torch.Size(spatial).numel() * 4
    name = type(make_head(classes[0])).__name__
    assert large - small < logit_growth / 10, (
        f"{name}: a training step's peak grows by {(large - small) / 2**20:.1f} MiB from C={classes[0]} to "
        f"C={classes[1]}, over a tenth of what one b×C×S logit tensor adds ({logit_growth / 2**20:.1f} MiB)"
    )
