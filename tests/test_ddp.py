"""Under DDP (nnU-Net's -num_gpus > 1) the heads' batch Dice is the whole batch's, as nnU-Net's ``ddp=True`` loss.

Two CPU processes in a gloo group each take half of a batch. With ``ddp=True`` every process's Dice term must
equal the Dice of the concatenated batch in one process, computed by independent references (float64
restatements, nnU-Net's own loss); the CE or BCE term stays each process's own. Gradients follow nnU-Net's
``AllGatherGrad`` convention, under which DDP's averaging of the processes' gradients gives the gradient of
the concatenated batch's loss: (1/W)·∂L_r/∂basis_r is that gradient's slice r, and the mean of ∂L_r/∂E is ∂L/∂E.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import headzoo
from headzoo.heads.chunked import chunked_dc_and_ce_loss
from headzoo.nnunet.trainer import make_trainer
from reference import reference_dc_and_ce
from test_sigmoid import reference_eq2

WORLD, BATCH, CLASSES, RANK, SPATIAL = 2, 4, 9, 3, (4, 3, 3)


def _triton_kernels():
    """heads/chunked_triton.py where it runs on these CPU tensors (triton installed, its interpreter chosen)."""
    try:
        from headzoo.heads import chunked_triton
    except ImportError:
        return None
    return chunked_triton if chunked_triton.INTERPRETED else None


def _inputs():
    """The whole batch, the same in every process: chunked basis and operator, features, labels, annotated mask."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(BATCH, RANK, *SPATIAL, dtype=torch.float64, generator=generator)
    operator = torch.randn(RANK, CLASSES, dtype=torch.float64, generator=generator)
    features = torch.randn(BATCH, 5, *SPATIAL, generator=generator)
    target = torch.randint(0, CLASSES, (BATCH, 1, *SPATIAL), generator=generator)
    annotated = torch.rand(BATCH, CLASSES, generator=generator) > 0.3
    return basis, operator, features, target, annotated


def _chunked(loss_fn, basis, operator, dtype, scale=1.0):
    basis, operator = basis.to(dtype).requires_grad_(), operator.to(dtype).requires_grad_()
    loss = loss_fn(basis, operator)
    return [loss.detach().double(), *(scale * g.double() for g in torch.autograd.grad(loss, (basis, operator)))]


def _heads(ddp: bool):
    """dense (nnU-Net's DC_and_CE_loss, Dice only) and sigmoid, plain and chunked, with the same weights everywhere."""
    heads = {}
    for name, options in (("dense", dict(batch_dice=True, weight_ce=0.0)), ("sigmoid", {}), ("sigmoid", {"rank": 3})):
        torch.manual_seed(1)
        heads[name + "".join(f"_{k}{v}" for k, v in options.items() if k == "rank")] = headzoo.create_head(
            name, 5, CLASSES, ddp=ddp, **options
        )
    return heads


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    basis, operator, features, target, annotated = (
        t.chunk(WORLD)[rank] if t.shape[0] == BATCH else t for t in _inputs()
    )
    results = {}
    for settings in (dict(weight_ce=0.0), {}):  # the Dice alone, then CE + Dice for the gradients
        name = "dice" if settings else "loss"
        results[f"chunked_{name}"] = _chunked(
            lambda x, e: chunked_dc_and_ce_loss(x, e, target, 4, batch_dice=True, ddp=True, **settings),
            basis,
            operator,
            torch.float64,
        )
        kernels = _triton_kernels()
        if kernels is not None:
            results[f"triton_{name}"] = _chunked(
                lambda x, e: kernels.triton_chunked_dc_and_ce_loss(
                    x, e, target, batch_dice=True, ddp=True, block_voxels=16, block_classes=16, **settings
                ),
                basis,
                operator,
                torch.float32,
            )
    for name, head in _heads(ddp=True).items():
        output = head(features)
        loss = head.loss(output, target, annotated if head.accepts_annotated else None)
        results[name] = [loss.detach().double(), head.logits(output, slice(1, CLASSES)).detach().double()]
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _run_group(tmp_path) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


def _close(got, want, tolerance):
    assert float((got - want).abs().max()) <= tolerance * max(1.0, float(want.abs().max())), (got, want)


def _reference_batch_dice(logits, target, annotated):
    """MultiTalent's batch Dice term Σ_c 2Σ m·p·y / max(Σ m·(p + y), 1e−7), float64, from the formula."""
    y = (target.flatten(1).unsqueeze(1) == torch.arange(1, CLASSES).view(1, -1, 1)).double()
    p, m = torch.sigmoid(logits.flatten(2).double()), annotated[:, 1:, None].double()
    return (2 * (m * p * y).sum((0, 2)) / (m * (p + y)).sum((0, 2)).clamp_min(1e-7)).sum()


@pytest.mark.slow
def test_gathered_dice_equals_one_process_dice_over_the_concatenated_batch(tmp_path):
    ranks = _run_group(tmp_path)
    basis, operator, features, target, annotated = _inputs()
    logits = torch.einsum("br...,rc->bc...", basis, operator)
    whole_dice = reference_dc_and_ce(logits, target, weight_ce=0.0)
    whole_loss = _chunked(
        lambda x, e: reference_dc_and_ce(torch.einsum("br...,rc->bc...", x, e), target), basis, operator, torch.float64
    )
    paths = [("chunked", 1e-12)] + [("triton", 1e-5)] * (_triton_kernels() is not None)
    for path, tolerance in paths:
        for rank, result in enumerate(ranks):
            _close(result[f"{path}_dice"][0], whole_dice, tolerance)  # each process: the whole batch's Dice
            _close(result[f"{path}_loss"][1] / WORLD, whole_loss[1].chunk(WORLD)[rank], tolerance)  # ∂basis_r
        _close(sum(result[f"{path}_loss"][0] for result in ranks) / WORLD, whole_loss[0], tolerance)
        _close(sum(result[f"{path}_loss"][2] for result in ranks) / WORLD, whole_loss[2], tolerance)  # ∂E

    dense = _heads(ddp=False)["dense"]  # nnU-Net's own loss (ddp=False) on the whole batch
    _close(ranks[0]["dense"][0], dense.loss(dense(features), target).detach().double(), 1e-6)
    _close(ranks[1]["dense"][0], ranks[0]["dense"][0], 1e-6)
    for name in ("sigmoid", "sigmoid_rank3"):
        whole_logits = torch.cat([result[name][1] for result in ranks])
        whole = _reference_batch_dice(whole_logits, target, annotated)
        for rank, result in enumerate(ranks):
            logits, labels, mask = result[name][1], target.chunk(WORLD)[rank], annotated.chunk(WORLD)[rank]
            # eq. (2) of this process's samples with its own batch Dice replaced by the whole batch's
            _close(
                result[name][0],
                reference_eq2(logits.flatten(2), labels.flatten(1), mask)
                + _reference_batch_dice(logits, labels, mask)
                - whole,
                1e-5,
            )


def test_trainer_builds_heads_with_ddp_under_ddp_only():
    for head, expected in (
        ("chunked", {"ddp": True}),
        ("dense", {"ddp": True}),
        ("sigmoid", {"ddp": True}),
        ("knn", {}),
    ):  # knn has no Dice statistics, so no ddp option
        trainer = object.__new__(make_trainer(head))
        trainer.is_ddp = True
        assert trainer.distributed_options() == expected, head
        trainer.is_ddp = False
        assert trainer.distributed_options() == {}


def test_ddp_outside_a_process_group_is_one_line():
    for head in ("chunked", "dense", "sigmoid"):
        try:
            headzoo.create_head(head, 5, CLASSES, ddp=True)
        except headzoo.HeadzooError as error:
            assert "ddp must be false outside a torch.distributed process group" in str(error)
        else:
            raise AssertionError(f"{head} took ddp=True without a process group")
