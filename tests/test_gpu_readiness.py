"""What a first GPU run would get wrong, checked on a CPU (issue 20): OOM matching, the memory step after the
optimizer has its state, an evaluation OOM that keeps the training numbers, memory held outside torch, the knn
backend as resolved and its search blocks, nnU-Net's cuDNN setting."""

import importlib.util
import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import headzoo
from headzoo import training
from networks import ConvThenHead
from headzoo.config import RunConfig
from headzoo.heads import knn
from headzoo.measure import GradientReceivers, configure_cuda_timing, is_out_of_memory, optimizer_state_complete


@pytest.mark.parametrize(
    "error,expected",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.00 GiB"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't allocate memory"),
            True,
        ),
        (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"), False),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
        (ValueError("out of memory"), False),  # a message alone is not enough: torch raises these as RuntimeError
    ],
)
def test_out_of_memory_matching(error, expected):
    assert is_out_of_memory(error) is expected


def test_triton_out_of_resources_is_out_of_memory():
    errors = pytest.importorskip("triton.runtime.errors")
    assert is_out_of_memory(errors.OutOfResources(393216, 232448, "shared memory"))
    assert not is_out_of_memory(errors.TritonError("another Triton failure"))


def _schedulefree(model: nn.Module):
    import schedulefree

    optimizer = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-3)
    optimizer.train()  # touches self.state[p] for every parameter: an empty entry is not state
    return optimizer


def test_optimizer_state_is_complete_only_after_a_real_step():
    """GradScaler skips the optimizer's step when the gradients overflow: ScheduleFree has no state after it."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = _schedulefree(model)
    scaler = torch.amp.GradScaler("cpu")
    for overflow in (True, False):
        scaler.scale(model(torch.randn(4, 3)).square().sum()).backward()
        if overflow:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        assert optimizer_state_complete(optimizer) is not overflow
    assert scaler.get_scale() == 2.0**15  # the skipped step halved the scale: it really was skipped


def test_state_is_complete_for_the_parameters_that_receive_gradients():
    """A parameter no loss reaches (nnU-Net's lower seg layers without deep supervision) never gets state."""
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    optimizer = _schedulefree(model)
    receivers = GradientReceivers(model)
    assert not optimizer_state_complete(optimizer, receivers.received)  # nothing received yet
    model["used"](torch.randn(4, 3)).sum().backward()
    optimizer.step()
    assert receivers.received == set(model["used"].parameters())
    assert optimizer_state_complete(optimizer, receivers.received) and not optimizer_state_complete(optimizer)
    receivers.close()
    model["unused"](torch.randn(4, 3)).sum().backward()
    assert receivers.received == set(model["used"].parameters())  # closed: no hook left


def _batches():
    generator = torch.Generator().manual_seed(0)
    while True:
        yield {
            "data": torch.randn(2, 1, 4, 4, 4, generator=generator),
            "target": torch.randint(0, 5, (2, 1, 4, 4, 4), generator=generator),
            "annotated": None,
        }


COUNTER = SimpleNamespace(
    mean_foreground=lambda: 0.5, worst_mean=lambda fraction: 0.25, pooled_mean=lambda: 0.75, classes_scored=lambda: 4
)


def _train(monkeypatch, skipped_steps=0, evaluate=lambda *args: COUNTER, steps=8, eval_every=None):
    """train_and_evaluate on a 1×1×1 conv backbone and a chunked head, the optimizer's first `skipped_steps`
    steps skipped as a GradScaler skips them on overflow, and `evaluate` in place of sliding windows."""
    real_build = training.build_optimizer

    def build_with_skips(network, steps, lr):
        optimizer = real_build(network, steps, lr)
        real_step, calls = optimizer.step, itertools.count()
        optimizer.step = lambda closure=None: None if next(calls) < skipped_steps else real_step(closure)
        return optimizer

    monkeypatch.setattr(training, "build_optimizer", build_with_skips)
    monkeypatch.setattr(training, "evaluate", evaluate)
    torch.manual_seed(0)
    network = ConvThenHead(nn.Conv3d(1, 4, 1), headzoo.create_head("chunked", 4, 5, rank=2))
    network.unused = nn.Linear(2, 2)  # as nnU-Net's lower seg layers in a run: no gradient, no optimizer state
    config = RunConfig(head="chunked", classes=5, patch=(4, 4, 4), steps=steps, warmup=1, eval_every=eval_every)
    return training.train_and_evaluate(config, network, torch.device("cpu"), _batches(), None, False)


def test_memory_step_waits_until_every_parameter_has_optimizer_state(monkeypatch):
    parameters = 4 * 2 + 2 + 2 * 5 + 1 * 4 + 4  # head basis conv, operator; backbone conv (not the unused layer)
    every_step = _train(monkeypatch)
    assert (every_step["memory_step"], every_step["memory_step_optimizer_state_complete"]) == (1, True)
    skipped = _train(monkeypatch, skipped_steps=3)  # steps 0–2 skipped, step 3 makes the state: step 4 is measured
    assert (skipped["memory_step"], skipped["memory_step_optimizer_state_complete"]) == (4, True)
    assert skipped["peak_memory_bytes"] == every_step["peak_memory_bytes"]
    assert skipped["timed_steps"] == 8 - 5
    monkeypatch.setattr(training, "MEMORY_STEP_WAIT", 0)  # what the step after warm-up alone measured
    early = _train(monkeypatch, skipped_steps=3)
    assert (early["memory_step"], early["memory_step_optimizer_state_complete"]) == (1, False)
    # ScheduleFree's z and exp_avg_sq: 8 B per fp32 parameter, missing from the early peak
    assert every_step["peak_memory_bytes"] - early["peak_memory_bytes"] == 8 * parameters


def test_memory_step_waits_at_most_until_one_step_is_left_to_time(monkeypatch):
    result = _train(monkeypatch, skipped_steps=100, steps=6)
    assert (result["memory_step"], result["memory_step_optimizer_state_complete"], result["timed_steps"]) == (
        4,
        False,
        1,
    )


def test_evaluation_out_of_memory_keeps_the_training_numbers(monkeypatch):
    calls = []

    def out_of_memory(*args):
        calls.append(args)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.00 GiB")

    result = _train(monkeypatch, evaluate=out_of_memory, eval_every=3)
    assert len(calls) == 1  # the first evaluation ran out of memory: none after it, training went on
    assert (result["status"], result["oom_phase"]) == ("oom", "evaluation")
    assert result["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 28.00 GiB"
    assert result["peak_memory_bytes"] > 0 and result["step_time_median_s"] > 0 and result["timed_steps"] == 6
    assert result["dice_mean"] is None and result["curve"] is None


def test_evaluation_errors_other_than_out_of_memory_are_raised(monkeypatch):
    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        _train(monkeypatch, evaluate=broken)


def test_a_run_without_oom_has_no_status_of_its_own(monkeypatch):
    result = _train(monkeypatch)
    assert "status" not in result and result["dice_mean"] == 0.5 and result["external_memory_bytes"] == 0


def test_external_memory_is_zero_for_heads_that_hold_none():
    for name in headzoo.list_heads():
        assert headzoo.create_head(name, 4, 6).external_memory_bytes() == 0, name


def test_knn_backend_is_recorded_as_resolved(monkeypatch):
    head = headzoo.create_head("knn", 4, 6)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert head.resolved_options(cpu) == {"knn_backend": "faiss"}  # faiss-cpu is a dependency
    gpu_faiss = hasattr(knn._faiss(), "StandardGpuResources")
    assert head.resolved_options(cuda) == {"knn_backend": "faiss" if gpu_faiss else "torch"}
    assert headzoo.create_head("knn", 4, 6, knn_backend="torch").resolved_options(cpu) == {"knn_backend": "torch"}
    monkeypatch.setitem(sys.modules, "faiss", None)  # FAISS missing
    assert head.resolved_options(cpu) == {"knn_backend": "torch"}


def test_torch_search_blocks_are_sized_by_a_memory_budget(monkeypatch):
    assert knn.search_block_rows(1000, torch.device("cpu")) == 2**22 // 4000
    properties = SimpleNamespace(total_memory=80 * 10**9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    # an 80 GB GPU: 156 MB of distances a block, so 2×192³ voxels at C = 1000 take 363 blocks, not ~13.5k
    rows = knn.search_block_rows(1000, torch.device("cuda"))
    assert rows == 80 * 10**9 // 512 // 4000 and -(-2 * 192**3 // rows) == 363


def test_blocked_torch_search_equals_one_brute_force_search(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    classes, queries = torch.randn(50, 6, generator=generator), torch.randn(103, 6, generator=generator)
    monkeypatch.setattr(knn, "CPU_SEARCH_BLOCK_BYTES", 4 * 50 * 10)  # 10 queries a block: 11 blocks
    index = knn.ClassIndex("torch")
    index.update(classes, key=0)
    brute = torch.cdist(queries.double(), classes.double()).topk(4, dim=1, largest=False).indices
    assert torch.equal(index.search(queries, 4), brute)


def test_cuda_timing_settings_are_nnunets():
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        torch.backends.cudnn.benchmark = False
        assert configure_cuda_timing(torch.device("cpu")) == {"cudnn_benchmark": False, "compiled": False}
        assert not torch.backends.cudnn.benchmark
        assert configure_cuda_timing(torch.device("cuda")) == {"cudnn_benchmark": True, "compiled": False}
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def _gpu_check():
    """benchmarks/gpu_check.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_check_plans_every_gpu_path():
    gpu_check = _gpu_check()
    names = [check.name for check in gpu_check.plan()]
    assert names[:3] == ["cuda", "triton-tests", "triton-vs-torch"]
    variants = [h for h in headzoo.list_heads()] + ["chunked-kernel=triton", "knn-knn_backend=torch"]
    for prefix in ("amp-step-", "run-", "estimate-"):
        assert [n[len(prefix) :] for n in names if n.startswith(prefix)] == variants
    assert names.index("faiss-gpu") < names.index("loss-profile") < names.index("nnunet-smoke")
    assert max(names.index(f"run-{v}") for v in variants) < min(names.index(f"estimate-{v}") for v in variants)
    assert [c.name for c in gpu_check.plan(["run-*", "cuda"])] == ["cuda"] + [f"run-{v}" for v in variants]
    with pytest.raises(headzoo.HeadzooError, match="no check named runs, nope"):
        gpu_check.plan(["runs", "nope"])


def test_gpu_check_reports_one_line_per_check_and_fails_on_a_failure(tmp_path):
    gpu_check = _gpu_check()

    def fails(context):
        raise ValueError("loss off by 3e-2\nsecond line")

    def skips(context):
        raise gpu_check.Skipped("this FAISS has no GPU support")

    checks = [
        gpu_check.Check("fast", lambda context: {"ratio": 0.4321, "curve": [1, 2], "bad": float("nan")}),
        gpu_check.Check("broken", fails),
        gpu_check.Check("faiss", skips),
    ]
    lines, records = [], tmp_path / "gpu_check.jsonl"
    environment = {"device_name": "NVIDIA H200", "torch": "2.13.0", "git_sha": "abc1234", "time": "t1"}

    def report(result):
        lines.append(gpu_check.report_line(result))
        gpu_check.append_record(records, result, environment)

    results = gpu_check.run_checks(checks, gpu_check.Context(torch.device("cpu"), tmp_path), report)
    assert [line.split()[:2] for line in lines] == [["ok", "fast"], ["failed", "broken"], ["skipped", "faiss"]]
    assert lines[0].endswith("ratio=0.4321  bad=nan") and lines[1].endswith("ValueError: loss off by 3e-2")
    assert lines[2].endswith("this FAISS has no GPU support")
    assert gpu_check.exit_code(results) == 1 and gpu_check.exit_code([results[0], results[2]]) == 0
    rows = [json.loads(line) for line in records.read_text().splitlines()]  # strict JSON: the NaN is null
    assert rows[0]["numbers"] == {"ratio": 0.4321, "curve": [1, 2], "bad": None}
    assert rows[1]["device_name"] == "NVIDIA H200" and rows[1]["why"] == "ValueError: loss off by 3e-2"
    gpu_check.append_record(records, gpu_check.Result("fast", "ok", 2.0, {"ratio": 0.5}), {**environment, "time": "t2"})
    table = gpu_check.render(records)
    assert "## NVIDIA H200" in table and "| fast | ok | 2.0 | ratio 0.5 | t2 | abc1234 |" in table
    assert "0.4321" not in table  # the latest record of each check


def test_gpu_check_without_cuda_says_so_in_one_line(monkeypatch, capsys):
    gpu_check = _gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_gpu_check_refuses_an_unknown_check_before_touching_the_gpu(monkeypatch, capsys):
    gpu_check = _gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_check.main(["--only", "triton-test"]) == 2
    assert "no check named triton-test" in capsys.readouterr().err
