"""The fused Triton loss (heads/chunked_triton.py) equals the torch path and a float64 restatement.

Without CUDA the kernels run on CPU tensors in Triton's interpreter. Triton picks compiled or
interpreted mode for its own library functions when triton is first imported, and for ours when
heads/chunked_triton.py is imported, so TRITON_INTERPRET=1 has to be set before either: conftest.py
sets it before any test module is imported. With CUDA and no TRITON_INTERPRET, the same tests run
the compiled kernels on the GPU. The head's option in a fresh process, with and without the
interpreter, is checked by subprocesses.

Tolerances (errors against the float64 reference on the same, rounded, inputs; gradients as the
largest error over the largest reference entry): fp32 1e-5, fp16 1e-3 (Cut Cross-Entropy's),
bf16 2e-2 (twice Cut Cross-Entropy's: the Dice term's logit gradients cancel over classes, and at
C = 2 the bf16 rounding of ∂z before its dot with E shows at 1.1e-2).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import headzoo
from headzoo.heads.chunked import chunked_dc_and_ce_loss
from reference import reference_dc_and_ce

pytest.importorskip("triton", reason="triton is not installed (pip install 'headzoo[triton]')")

GRADIENT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}
LOSS_TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def kernels():
    from headzoo.heads import chunked_triton

    if not chunked_triton.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no CUDA device")
    return chunked_triton


def _device(kernels) -> str:
    return "cpu" if kernels.INTERPRETED else "cuda"


def _problem(b, num_classes, spatial, rank, dtype, seed=0, ignore_label=None, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(b, rank, *spatial, generator=generator).to(device, dtype)
    operator = torch.randn(rank, num_classes, generator=generator).to(device, dtype)
    target = torch.randint(0, num_classes, (b, 1, *spatial), generator=generator).to(device)
    if ignore_label is not None:
        target[0, 0, :2] = ignore_label
    return basis, operator, target


def _loss_and_grads(loss_fn, basis, operator):
    basis, operator = basis.clone().requires_grad_(), operator.clone().requires_grad_()
    loss = loss_fn(basis, operator)
    return (loss.detach(), *torch.autograd.grad(loss, (basis, operator)))


def _reference(basis, operator, target, **options):
    """Loss and gradients in float64 on the CPU from the same (rounded) inputs: logits materialised."""
    return _loss_and_grads(
        lambda x, e: reference_dc_and_ce(torch.einsum("br...,rc->bc...", x, e), target.cpu(), **options),
        basis.cpu().double(),
        operator.cpu().double(),
    )


def _assert_close(got, want, dtype):
    loss, *grads = got
    assert abs(float(loss) - float(want[0])) <= LOSS_TOLERANCE[dtype] * abs(float(want[0]))
    for name, grad, expected in zip(("∂basis", "∂E"), grads, want[1:]):
        assert grad.dtype == dtype, name
        error = float((grad.cpu().double() - expected.cpu().double()).abs().max() / expected.abs().max())
        assert error <= GRADIENT_TOLERANCE[dtype], f"{name}: {error:.2e}"


SLOW = pytest.mark.slow  # the interpreter runs each tile in Python: the larger cases run in the slow suite
CASES = [  # (b, C, spatial, rank, loss options, block_voxels, block_classes, voxel_splits)
    pytest.param(
        2, 45, (5, 4, 3), 5, dict(batch_dice=True), 16, 16, 3, marks=SLOW
    ),  # C, S not tile multiples; 3 splits
    pytest.param(2, 45, (5, 4, 3), 5, dict(batch_dice=False), 16, 16, 2, marks=SLOW),
    (1, 2, (7, 3, 3), 3, dict(batch_dice=True), 16, 16, 1),  # C = 2
    pytest.param(
        2, 13, (5, 5, 3), 20, dict(batch_dice=False, ignore_label=13), 16, 16, 2, marks=SLOW
    ),  # rank 20: tile 32
    (
        2,
        9,
        (4, 4, 3),
        4,
        dict(batch_dice=True, do_bg=True, smooth=0.5, weight_ce=0.7, weight_dice=1.3, ignore_label=9),
        16,
        16,
        1,
    ),
    (1, 70, (6, 6, 5), 8, dict(batch_dice=False), 64, 64, None),  # the default tile: 2 class tiles, 3 voxel blocks
]


@pytest.mark.parametrize("b,num_classes,spatial,rank,options,block_voxels,block_classes,splits", CASES)
def test_fp32_equals_torch_path_and_float64(
    kernels, b, num_classes, spatial, rank, options, block_voxels, block_classes, splits
):
    basis, operator, target = _problem(
        b, num_classes, spatial, rank, torch.float32, ignore_label=options.get("ignore_label"), device=_device(kernels)
    )
    fused = _loss_and_grads(
        lambda x, e: kernels.triton_chunked_dc_and_ce_loss(
            x, e, target, **options, block_voxels=block_voxels, block_classes=block_classes, voxel_splits=splits
        ),
        basis,
        operator,
    )
    _assert_close(fused, _reference(basis, operator, target, **options), torch.float32)
    _assert_close(
        fused,
        _loss_and_grads(lambda x, e: chunked_dc_and_ce_loss(x, e, target, 4, **options), basis, operator),
        torch.float32,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,num_classes,spatial,rank,options,block_voxels,block_classes,splits", CASES[:4])
def test_half_precision_within_tolerance(
    kernels, dtype, b, num_classes, spatial, rank, options, block_voxels, block_classes, splits
):
    basis, operator, target = _problem(
        b, num_classes, spatial, rank, dtype, ignore_label=options.get("ignore_label"), device=_device(kernels)
    )
    fused = _loss_and_grads(
        lambda x, e: kernels.triton_chunked_dc_and_ce_loss(
            x, e, target, **options, block_voxels=block_voxels, block_classes=block_classes, voxel_splits=splits
        ),
        basis,
        operator,
    )
    _assert_close(fused, _reference(basis, operator, target, **options), dtype)


@pytest.mark.slow  # Triton's interpreter, twice
def test_fixed_launch_is_bitwise_reproducible(kernels):
    """Per-class sums go through a (splits, C) buffer, not atomics: the same launch gives the same bits."""
    basis, operator, target = _problem(2, 45, (5, 4, 3), 5, torch.float32, device=_device(kernels))
    runs = [
        _loss_and_grads(
            lambda x, e: kernels.triton_chunked_dc_and_ce_loss(
                x, e, target, block_voxels=16, block_classes=16, voxel_splits=3
            ),
            basis,
            operator,
        )
        for _ in range(2)
    ]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_head_option_kernel_triton_equals_torch(kernels):
    torch.manual_seed(0)
    features = torch.randn(2, 6, 4, 4, 3, device=_device(kernels))
    target = torch.randint(0, 23, (2, 1, 4, 4, 3), device=_device(kernels))
    results = []
    for kernel in ("torch", "triton"):
        torch.manual_seed(1)
        head = headzoo.create_head("chunked", 6, 23, rank=4, chunk=7, kernel=kernel).to(_device(kernels))
        loss = head.loss(head(features), target)
        results.append((loss.detach(), *torch.autograd.grad(loss, list(head.parameters()))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_auto_uses_torch_on_cpu_tensors():
    assert headzoo.create_head("chunked", 6, 23, rank=4).kernel == "torch"  # the default
    head = headzoo.create_head("chunked", 6, 23, rank=4, kernel="auto")
    assert not head._uses_triton(torch.zeros(1, 4, 2, 2, 2))


def test_unknown_kernel_is_rejected():
    with pytest.raises(headzoo.HeadzooError, match="kernel must be torch, triton or auto"):
        headzoo.create_head("chunked", 4, 10, kernel="cuda")


SCRIPT = """
import torch, headzoo
head = headzoo.create_head("chunked", 3, 5, rank=2, kernel="triton")
features, target = torch.randn(1, 3, 4, 4, 2), torch.randint(0, 5, (1, 1, 4, 4, 2))
head.loss(head(features), target).backward()
print("ran", head.operator.grad.abs().sum() > 0)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="kernel=triton on a CPU-only machine is checked")
@pytest.mark.parametrize(
    "interpret,expected",
    [
        ("1", "ran tensor(True)"),
        (None, "kernel=triton runs on CUDA tensors, or on the CPU under Triton's interpreter: set TRITON_INTERPRET=1"),
    ],
)
@pytest.mark.slow  # a fresh process importing Triton
def test_kernel_triton_in_a_fresh_process(interpret, expected):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = interpret
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert expected in result.stdout + result.stderr


@pytest.mark.parametrize("blocks", [dict(block_voxels=8), dict(block_classes=8), dict(block_classes=48)])
def test_tiles_under_16_or_not_powers_of_two_are_refused(kernels, blocks):
    basis, operator, target = _problem(1, 5, (4, 4, 2), 2, torch.float32, device=_device(kernels))
    with pytest.raises(headzoo.HeadzooError, match=f"{next(iter(blocks))} must be a power of two of at least 16"):
        kernels.triton_chunked_dc_and_ce_loss(basis, operator, target, **blocks)


def _compile_for_sm90(*arguments: str) -> dict:
    """tests/triton_aot.py in a process without TRITON_INTERPRET: kernel name → ptxas's report (or the error)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "triton_aot.py"), *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return {row["kernel"]: row for row in rows}


@pytest.mark.slow
def test_sm90_code_uses_tensor_cores_without_spilling():
    """The kernels as a GPU would run them (compiled ahead of time for sm_90, no GPU needed): fp32 tiles on
    tensor cores (tf32x3), at most 12 B/thread of spill stores at rank 32 with 8 warps (with input_precision
    "ieee" every kernel had 0 mma instructions and 324–664 B of spill)."""
    reports = _compile_for_sm90("--dtype", "fp32", "--rank", "32")
    assert len(reports) == 5
    for name, report in reports.items():
        assert "error" not in report, report
        assert report["mma_instructions"] > 0, name
        assert report["spill_store_bytes"] <= 12, report


@pytest.mark.slow
def test_8x8_tiles_fail_to_compile_for_sm90():
    """Why tiles under 16 are refused: they run in the interpreter but tl.dot cannot compile them for a GPU."""
    report = _compile_for_sm90("--block-voxels", "8", "--block-classes", "8", "--kernels", "_grad_basis_kernel")
    assert report["_grad_basis_kernel"]["error"].startswith("CompilationError"), report
