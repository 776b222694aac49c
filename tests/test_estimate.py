"""`headzoo estimate`: the fake-tensor estimate equals the real CPU MemTracker peak for every registered head and
variant, and the shipped CUDA autocast lists are the installed torch's (read from its dispatch table and probed
through its own AutocastCUDA kernels)."""

import contextlib
import itertools
import json
import logging
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import headzoo
from headzoo import cuda_autocast
from headzoo.backbone import attach_head, build_network, get_backbone, head_of
from headzoo.errors import HeadzooError
from headzoo.estimate import (
    Problem,
    estimate_inference,
    estimate_loss,
    estimate_step,
    problem_from_settings,
    track_peak,
)
from headzoo.measure import measure_peak_memory
from headzoo.registry import get_head_class

C, PATCH, VOLUME = 12, (16, 16, 16), (16, 24, 20)
VARIANTS = [(name, options) for name in headzoo.list_heads() for options in ({}, *get_head_class(name).variants)]


def _id(variant):
    name, options = variant
    return name + "".join(f"-{k}={x}" for k, x in options.items())


def _problem(name: str, options: dict) -> Problem:
    return problem_from_settings({"head": name, "options": options, "classes": C, "patch": PATCH}, "cpu", VOLUME)


def _real_network(problem: Problem) -> torch.nn.Module:
    config = problem.config
    backbone, features = build_network(get_backbone(config.backbone)[0], problem.in_channels, config.seed)
    return attach_head(backbone, headzoo.create_head(config.head, features, C, **config.options))


def _real_batch(problem: Problem) -> dict:
    generator = torch.Generator().manual_seed(0)
    shape = (problem.config.batch, 1, *problem.config.patch)
    return {
        "data": torch.randn(shape, generator=generator),
        "target": torch.randint(0, C, shape, generator=generator).to(torch.int16),
        "annotated": None,
    }


@pytest.mark.parametrize(  # the fast run checks chunked; the slow run every head and variant
    "variant", [pytest.param(v, id=_id(v), marks=() if v == ("chunked", {}) else pytest.mark.slow) for v in VARIANTS]
)
def test_estimate_equals_the_real_cpu_peak(variant):
    """Step (after a warm-up step), loss alone and inference: the fake estimate is the real run's MemTracker peak."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    from headzoo.inference import sliding_window_output
    from headzoo.training import TrainStep, build_optimizer

    problem = _problem(*variant)
    torch.manual_seed(0)
    network = _real_network(problem)
    optimizer = build_optimizer(network, 10, 1e-3)
    network.train()
    optimizer.train()
    step = TrainStep(problem.config, network, optimizer, torch.device("cpu"))
    batch = _real_batch(problem)
    step(batch)  # warm-up: the optimizer's state
    real = measure_peak_memory(
        lambda: step(batch), torch.device("cpu"), network, optimizer, batch["data"], batch["target"]
    ).bytes
    assert estimate_step(problem).bytes == real

    network = _real_network(problem)  # fresh, as the estimate's: no gradients, an empty knn index
    head, target = head_of(network), batch["target"]
    with torch.no_grad():
        output = head(torch.randn(problem.config.batch, head.in_channels, *PATCH))
    output.requires_grad_()
    real_loss = measure_peak_memory(
        lambda: head.loss(output, target).backward(), torch.device("cpu"), head, output, target
    ).bytes
    assert estimate_loss(problem).bytes == real_loss

    image, volume = torch.randn(1, 1, *PATCH), torch.randn(1, *VOLUME)
    patch_network, volume_network = _real_network(problem).eval(), _real_network(problem).eval()

    def one_patch():
        with torch.no_grad():
            head_of(patch_network).predict(patch_network(image))

    def whole_volume():
        head_of(volume_network).predict(sliding_window_output(volume_network, volume, PATCH)[None])

    compute_gaussian.cache_clear()  # nnU-Net caches it: made inside the measured region, as on a first call
    patch_peak, volume_peak = estimate_inference(problem)
    assert patch_peak.bytes == measure_peak_memory(one_patch, torch.device("cpu"), patch_network, image).bytes
    # torch's MemTracker refuses a module called twice (the windows): PeakTracker is MemTracker without that
    assert volume_peak.bytes == track_peak(whole_volume, volume_network, volume).bytes


@pytest.mark.parametrize("name", ["chunked", "knn", "sigmoid"])
@pytest.mark.slow  # fake and real steps of a backbone per head
def test_estimate_equals_the_real_cpu_peak_with_an_ignore_label(name):
    """Ignored voxels stay in the loss with weight 0 (fixed shapes), so an ignore label is estimated exactly too."""
    from headzoo.training import TrainStep, build_optimizer

    problem = _problem(name, {"ignore_label": C})
    torch.manual_seed(0)
    network = _real_network(problem)
    optimizer = build_optimizer(network, 10, 1e-3)
    optimizer.train()
    step = TrainStep(problem.config, network, optimizer, torch.device("cpu"))
    batch = _real_batch(problem)
    batch["target"][:, :, :4] = C  # a slab of ignored voxels
    step(batch)
    real = measure_peak_memory(
        lambda: step(batch), torch.device("cpu"), network, optimizer, batch["data"], batch["target"]
    ).bytes
    assert estimate_step(problem).bytes == real


def test_a_loss_whose_every_voxel_is_ignored_is_finite():
    """As nnU-Net's masked CE: 0, not NaN, when nothing is left (knn: only the margin term; chunked: only Dice)."""
    features = torch.randn(2, 6, 4, 4, 4)
    target = torch.full((2, 1, 4, 4, 4), C)
    for name in ("chunked", "knn"):
        head = headzoo.create_head(name, 6, C, ignore_label=C)
        loss = head.loss(head(features), target)
        assert torch.isfinite(loss), f"{name}: {loss}"
    knn = headzoo.create_head("knn", 6, C, ignore_label=C)
    assert torch.equal(knn.loss(knn(features), target), knn.margin_regulariser(knn.centroids()))


def test_knn_negatives_drop_the_target_or_the_farthest():
    from headzoo.heads.knn import knn_negatives

    generator = torch.Generator().manual_seed(0)
    neighbours = torch.stack([torch.randperm(20, generator=generator)[:6] for _ in range(50)])
    target = torch.where(torch.rand(50, generator=generator) < 0.5, neighbours[:, 2], torch.full((50,), 99))
    expected = [
        [n for n in row if n != t] if t in row else row[:-1] for row, t in zip(neighbours.tolist(), target.tolist())
    ]
    assert knn_negatives(neighbours, target).tolist() == expected


@pytest.mark.slow  # a backbone step on fake tensors
def test_dense_with_an_ignore_label_is_refused_in_one_line():
    """nnU-Net's DC_and_CE_loss branches on the count of labelled voxels when it has an ignore label."""
    with pytest.raises(HeadzooError, match="the dense head is not fake-safe"):
        estimate_step(_problem("dense", {"ignore_label": C}))


@pytest.mark.slow  # a backbone step on fake tensors
def test_estimate_breaks_the_peak_down_and_names_its_op():
    peak = estimate_step(_problem("chunked", {}))
    assert sum(peak.categories.values()) == peak.bytes
    assert peak.categories["parameters"] > 0 and peak.categories["optimizer state"] > 0
    assert peak.op and peak.phase in ("forward", "backward", "optimizer step")


def test_a_head_that_needs_tensor_values_gets_one_line():
    class ValueBranch(headzoo.Head):
        """Branches on a loss value: not fake-safe."""

        def __init__(self, in_channels, num_classes, **plan_options):
            super().__init__(in_channels, num_classes, **plan_options)
            self.conv = torch.nn.Conv3d(in_channels, num_classes, 1)

        def forward(self, features):
            return self.conv(features)

        def loss(self, output, target, annotated=None):
            loss = output.mean()
            return loss if loss > 0 else -loss

    problem = _problem("dense", {})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("headzoo.estimate.create_head", lambda name, f, c, **options: ValueBranch(f, c, **options))
        with pytest.raises(HeadzooError, match="the dense head is not fake-safe"):
            estimate_loss(problem)


def test_estimate_refuses_a_triton_kernel_and_a_volume_below_the_patch():
    with pytest.raises(HeadzooError, match="kernel=triton cannot be estimated"):
        estimate_loss(
            problem_from_settings(
                {"head": "chunked", "options": {"kernel": "triton"}, "classes": C, "patch": PATCH}, "cpu", VOLUME
            )
        )
    with pytest.raises(HeadzooError, match="smaller than the patch"):
        problem_from_settings({"head": "dense", "classes": C, "patch": PATCH}, "cpu", (8, 16, 16))


@pytest.mark.slow  # a backbone step on fake tensors
def test_cuda_emulation_holds_fp16_copies_for_backward():
    """Under CUDA's autocast a conv saves its fp16 input for backward: the emulated step holds less than fp32."""
    settings = {"head": "chunked", "classes": C, "patch": PATCH}
    fp32 = estimate_step(problem_from_settings(settings, "cpu", VOLUME))
    emulated = estimate_step(problem_from_settings(settings, "cuda", VOLUME))
    assert emulated.categories["activations"] < fp32.categories["activations"]
    assert emulated.categories["parameters"] == fp32.categories["parameters"]


# --- CUDA's autocast op lists -------------------------------------------------------------------------------------


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _sample(argument, make):
    kind = str(argument.type)
    if "Tensor" in kind:
        return [make(), make()] if "List" in kind else make()
    if argument.has_default_value():
        return argument.default_value
    if "List[int]" in kind:
        return [1]
    scalar = 1 if argument.name == "ord" else 2
    samples = {
        "int": 1,
        "SymInt": 1,
        "float": 1.0,
        "bool": False,
        "Scalar": scalar,
        "number": scalar,
        "str": "fro" if argument.name == "ord" else "ij,jk->ik",
    }
    return samples.get(kind)


def _probe(op, device: str, dtypes: list, region) -> tuple[list, list, object]:
    """Call `op` on fake tensors of `dtypes` (in argument order) under `region`: the casts autocast made, the ops
    it redispatched to, and the result's dtype (or the error, when the sample shapes do not fit the op)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    counter = itertools.count()
    with FakeTensorMode():

        def make():
            return torch.ones(2, 2, device=device, dtype=dtypes[min(next(counter), len(dtypes) - 1)])

        values = {a.name: _sample(a, make) for a in op._schema.arguments}
        args = [values[a.name] for a in op._schema.arguments if not a.kwarg_only]
        kwargs = {a.name: values[a.name] for a in op._schema.arguments if a.kwarg_only}
        calls, result = _Calls(), None
        with region():
            try:
                with calls:
                    out = op(*args, **kwargs)
                result = (out[0] if isinstance(out, (tuple, list)) else out).dtype
            except Exception as error:
                result = str(error)
    casts = [kw.get("dtype") for f, _, kw in calls.calls if f is torch.ops.aten._to_copy.default]
    inner = [
        (f, a, kw) for f, a, kw in calls.calls if f is not torch.ops.aten._to_copy.default and f.namespace == "aten"
    ]
    return casts, inner, result


def _policy(name: str, device: str, region) -> str:
    op = cuda_autocast._op(name)
    casts, _, _ = _probe(op, device, [torch.float32], region)
    if torch.float16 in casts:
        return "lower_precision_fp"
    casts, inner, result = _probe(op, device, [torch.float16], region)
    if torch.float32 in casts:
        return "fp32"
    if inner and (any(torch.float32 in (*a, *kw.values()) for _, a, kw in inner[:1]) or result == torch.float32):
        has_dtype = any(a.name == "dtype" for a in op._schema.arguments)
        return "fp32_set_opt_dtype" if has_dtype else "fp32_append_dtype"
    casts, _, result = _probe(op, device, [torch.float16, torch.float32], region)
    if torch.float32 in casts:
        return "promote"
    return "banned" if "unsafe to autocast" in str(result) else f"none ({result})"


@contextlib.contextmanager
def _cuda_autocast():
    torch._C.set_autocast_enabled("cuda", True)  # the Python context refuses without a GPU; the kernels do not
    try:
        yield
    finally:
        torch._C.set_autocast_enabled("cuda", False)


@pytest.fixture(scope="module")
def quiet_fake_tensors():
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # the probes' sample shapes fail many ops after the casts: expected
    yield
    logger.setLevel(level)


def test_shipped_lists_are_the_installed_torchs_autocast_cuda_ops():
    registered = {
        n.removeprefix("aten::")
        for n in torch._C._dispatch_get_all_op_names()
        if torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCUDA")
    }
    shipped = set(cuda_autocast.POLICIES)
    assert registered == shipped, (
        f"torch {torch.__version__}'s AutocastCUDA ops drifted from "
        f"headzoo/cuda_autocast.py: new {sorted(registered - shipped)}, "
        f"gone {sorted(shipped - registered)}"
    )


@pytest.mark.slow  # every autocast op on fake tensors
def test_each_op_has_its_shipped_policy_in_cuda_autocast_and_in_the_emulation(quiet_fake_tensors):
    """Every op's policy as torch's own AutocastCUDA kernel applies it (fake CUDA tensors without grad work on a
    CPU-only torch) and as the emulation applies it on CPU tensors: both the shipped one."""
    wrong_cuda, wrong_emulation = {}, {}
    with cuda_autocast.cuda_autocast_kernels() as emulation:
        for name, shipped in cuda_autocast.POLICIES.items():
            if (found := _policy(name, "cuda", _cuda_autocast)) != shipped:
                wrong_cuda[name] = (shipped, found)
            if (found := _policy(name, "cpu", emulation.region)) != shipped:
                wrong_emulation[name] = (shipped, found)
    assert not wrong_cuda, f"torch's AutocastCUDA kernels differ from the shipped policies: {wrong_cuda}"
    assert not wrong_emulation, f"the emulation differs from the shipped policies: {wrong_emulation}"


def test_emulation_is_gone_after_the_estimate():
    with cuda_autocast.cuda_autocast_kernels():
        pass
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.softmax(torch.ones(3), 0).dtype == torch.float32  # CPU autocast leaves softmax alone
        assert torch.nn.functional.max_pool3d(torch.ones(1, 1, 2, 2, 2).half(), 2).dtype == torch.float32


# --- headzoo advise ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # estimates every head, then a real step
def test_advise_fits_exactly_at_the_estimated_peak(tmp_path):
    from headzoo.advise import advise

    peak = estimate_step(problem_from_settings({"head": "chunked", "classes": C, "patch": PATCH}, "cuda", None))
    for budget, fits in ((peak.bytes, True), (peak.bytes - 1, False)):
        advice, _ = advise(C, budget, "small", PATCH[0], 2, "cuda", tmp_path / "none.jsonl")
        chunked = next(a for a in advice if a.head == "chunked")
        assert chunked.fits is fits and chunked.peak_bytes == peak.bytes
        assert {a.head for a in advice} == set(headzoo.list_heads())


def test_advise_scales_batch_and_patch_from_the_fixed_and_growing_parts():
    from headzoo.advise import largest_batch, largest_patch
    from headzoo.estimate import Peak

    categories = {
        "parameters": 100,
        "gradients": 0,
        "optimizer state": 200,
        "activations": 700,
        "temporaries": 0,
        "inputs": 0,
    }
    peak = Peak(1000, categories, "mm", "backward")  # 300 fixed, 700 for batch 2 at 32³
    assert largest_batch(peak, 2, 300 + 350 * 5) == 5 and largest_batch(peak, 2, 300 + 350 * 5 - 1) == 4
    # 64³ holds 8× the 32³ activations: 300 + 5600
    assert largest_patch(peak, 32, 16, 300 + 5600) == 64 and largest_patch(peak, 32, 16, 300 + 5599) == 48


def test_advise_takes_the_nearest_measured_row():
    from headzoo.advise import nearest_measured

    row = {
        "head": "dense",
        "status": "ok",
        "options": {},
        "dice_mean": 0.5,
        "backbone": "small",
        "patch": [32] * 3,
        "batch": 2,
        "steps": 60,
        "device_name": "cpu",
        "step_time_median_s": 1.0,
        "time": "2026-01-01",
    }
    records = [
        {**row, "classes": 100, "dice_mean": 0.9},
        {**row, "classes": 1000, "dice_mean": 0.1},
        {**row, "classes": 500, "backbone": "resenc-l", "dice_mean": 0.3},
        {**row, "head": "knn", "classes": 500},
    ]
    assert nearest_measured(records, "dense", 300, "small", 32, 2)["dice_mean"] == 0.9  # log-nearest C
    assert nearest_measured(records, "dense", 300, "resenc-l", 32, 2)["dice_mean"] == 0.3  # same backbone first
    assert nearest_measured(records, "sigmoid", 300, "small", 32, 2) is None
    assert "C = 100" in nearest_measured(records, "dense", 300, "small", 32, 2)["where"]


# --- the commands ---------------------------------------------------------------------------------------------


def _command(arguments, capsys, monkeypatch) -> tuple[int, str, str]:
    from headzoo.cli import main

    monkeypatch.setattr(sys, "argv", ["headzoo", *arguments])
    code = 0
    try:
        main()
    except SystemExit as exit_info:
        code = exit_info.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow  # a full estimate through the CLI
def test_estimate_command_prints_json_and_its_table(capsys, monkeypatch):
    small = ["--head", "chunked", "--classes", str(C), "--patch", "16", "--volume", "16x24x20", "--device-kind", "cpu"]
    code, out, _ = _command(["estimate", *small, "--json"], capsys, monkeypatch)
    result = json.loads(out)
    assert code == 0 and result["training_step"]["bytes"] == estimate_step(_problem("chunked", {})).bytes
    assert set(result) >= {"training_step", "loss", "inference_patch", "inference_volume"}
    code, out, _ = _command(["estimate", *small], capsys, monkeypatch)
    assert code == 0 and "training step" in out and "lower bound" in out


def test_estimate_command_refuses_bad_input_in_one_line(capsys, monkeypatch):
    code, _, err = _command(["estimate", "--head", "chunked", "--device-kind", "tpu"], capsys, monkeypatch)
    assert code == 2 and err.strip() == "headzoo: error: --device-kind must be cuda or cpu, got 'tpu'"
    code, _, err = _command(["advise", "--classes", "10", "--memory", "lots"], capsys, monkeypatch)
    assert code == 2 and "cannot read 'lots' as a memory size" in err


@pytest.mark.slow  # estimates every head through the CLI
def test_advise_command_prints_json_per_head(capsys, monkeypatch, tmp_path):
    code, out, _ = _command(
        [
            "advise",
            "--classes",
            str(C),
            "--memory",
            "1GiB",
            "--backbone",
            "small",
            "--patch",
            "16",
            "--results",
            str(tmp_path / "none.jsonl"),
            "--json",
        ],
        capsys,
        monkeypatch,
    )
    result = json.loads(out)
    assert code == 0 and {a["head"] for a in result["advice"]} == set(headzoo.list_heads())
    assert all(a["fits"] is (a["peak_bytes"] <= 2**30) for a in result["advice"] if a["error"] is None)
    assert result["recommendation"]
