"""`headzoo estimate`: the peak memory of a training step, of the loss alone and of sliding-window inference at
any scale, in seconds, without a GPU and without allocating.

headzoo's own code runs: the backbone built from the backbone table as a run's plan builds it, the head from
the registry, `TrainStep` with its optimizer (state already made, as after the warm-up steps), `head.loss`,
`sliding_window_output` and `head.predict`, on fake tensors (torch's FakeTensorMode: shapes, dtypes and
devices, no data), while torch's MemTracker counts the bytes of every tensor alive, op by op, as it counts
them for a real CPU run (tests/test_estimate.py: byte-identical for every registered head and variant).
`device_kind="cuda"` runs the step's forward and loss under CUDA's autocast, emulated with CUDA's op lists
(headzoo.cuda_autocast); "cpu" runs them as a CPU run does, in fp32.

What it counts: every tensor torch allocates (parameters, gradients, optimizer state, activations saved for
backward, temporaries, inputs). What it does not: the CUDA context, cuDNN/cuBLAS workspaces, the caching
allocator's rounding and fragmentation, memory outside torch (a FAISS GPU index). It is a tensor-level lower
bound of what a GPU's allocator reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from headzoo.backbone import attach_head, build_network, check_patch, get_backbone, head_of
from headzoo.config import TOY_CLASSES, RunConfig
from headzoo.errors import HeadzooError
from headzoo.memtrack import TotalPeakTracker
from headzoo.registry import create_head, get_head_class

#: MemTracker's categories → the estimate's
CATEGORIES = {
    "Parameter": "parameters",
    "Buffer": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer state",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "inputs",
}
CATEGORY_ORDER = ("parameters", "gradients", "optimizer state", "activations", "temporaries", "inputs")
#: the loss options a run takes from nnU-Net's plan (head.PLAN_OPTIONS) where no dataset is given: the toy's
#: 3d_fullres plan has batch_dice false, and the toy has no ignore label
PLAN_DEFAULTS = {"batch_dice": False, "ignore_label": None}
#: the whole volume of the inference estimate by default: a TotalSegmentator CT at 1.5 mm (as
#: benchmarks/inference_memory.py)
DEFAULT_VOLUME = (244, 234, 287)
DEVICE_KINDS = ("cuda", "cpu")


@dataclass
class Peak:
    bytes: int
    categories: dict[str, int]  # CATEGORY_ORDER → bytes alive at the peak
    op: str  # the op that allocated the peak's last tensor
    phase: str  # forward, backward or optimizer step

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class PeakTracker(TotalPeakTracker):
    """torch's MemTracker with its whole-run peak only, and the op that reached it and in which phase.

    torch's also snapshots every module's memory at each module call and updates every module's peak at every op
    (most of an estimate's time at ResEnc-L scale; and it refuses a module called twice, as sliding windows do).
    The totals are the same: those hooks allocate nothing. Parameters' gradients are still told apart from
    backward temporaries (the gradient hooks are installed on the tracked modules)."""

    def __init__(self):
        super().__init__()
        self.peak_op, self.peak_phase, self._func = "", "", None

    def track_external(self, *external) -> None:
        super().track_external(*external)
        for module in external:
            if isinstance(module, torch.nn.Module):
                self._track_module_params_and_buffers(module, install_grad_hooks=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._func = func
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device], self._peak_mem_snap[device] = snapshot["Total"], dict(snapshot)
                self.peak_op = self._func.overloadpacket.__name__
                self.peak_phase = (
                    "optimizer step" if self._in_opt else "backward" if self._mod_tracker.is_bw else "forward"
                )


def track_peak(run: Callable[[], object], *tracked) -> Peak:
    """The peak of live tensor bytes while `run` runs; `tracked` (modules, optimizers, tensors) exist before."""
    tracker = PeakTracker()
    tracker.track_external(*tracked)
    with tracker:
        run()
    snapshot = tracker.get_tracker_snapshot("peak").get(torch.device("cpu"), {})
    categories = dict.fromkeys(CATEGORY_ORDER, 0)
    for kind, name in CATEGORIES.items():
        categories[name] += int(snapshot.get(kind, 0))
    return Peak(int(snapshot.get("Total", 0)), categories, tracker.peak_op, tracker.peak_phase)


@dataclass
class Problem:
    """What to estimate: a run's settings (RunConfig) on a device kind, and the whole volume to segment."""

    config: RunConfig
    device_kind: str = "cuda"
    volume: tuple[int, ...] = DEFAULT_VOLUME
    in_channels: int = 1

    @property
    def autocast(self) -> bool:
        return self.config.amp and self.device_kind == "cuda"


def problem_from_settings(settings: dict, device_kind: str, volume: tuple[int, ...] | None) -> Problem:
    """A Problem from `headzoo run`'s settings: the dataset's classes, channels and ignore label from its
    dataset.json (no preprocessing), else the toy preset's; the patch from the backbone table."""
    if device_kind not in DEVICE_KINDS:
        raise HeadzooError(f"--device-kind must be cuda or cpu, got '{device_kind}'")
    config = RunConfig(**settings)
    get_head_class(config.head)
    architecture, default_patch = get_backbone(config.backbone)
    config.patch = config.patch or (default_patch,) * 3
    check_patch(config.backbone, config.patch)
    if config.batch < 1:
        raise HeadzooError(f"--batch must be positive, got {config.batch}")
    plan = dict(PLAN_DEFAULTS)
    if config.dataset_folder is not None:
        dataset = _dataset_json(Path(config.dataset_folder))
        labels = dataset["labels"]
        ignore = labels.get("ignore")
        classes = len([k for k in labels if k != "ignore"])
        if config.classes not in (None, classes):
            raise HeadzooError(
                f"--classes {config.classes} disagrees with {config.dataset_folder}, which has {classes} labels"
            )
        config.classes, in_channels, plan["ignore_label"] = classes, len(dataset["channel_names"]), ignore
    else:
        from headzoo.toy import get_preset

        config.classes = config.classes or TOY_CLASSES
        in_channels = get_preset(config.preset).code_bits or 1
    if config.classes < 2:
        raise HeadzooError(f"--classes must be at least 2 (background and one class), got {config.classes}")
    config.options = {**plan, **config.options}
    volume = tuple(volume or DEFAULT_VOLUME)
    if any(v < p for v, p in zip(volume, config.patch)):
        raise HeadzooError(
            f"--volume {'x'.join(map(str, volume))} is smaller than the patch {'x'.join(map(str, config.patch))}"
        )
    return Problem(config, device_kind, volume, in_channels)


def _dataset_json(folder: Path) -> dict:
    try:
        return json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError) as error:
        raise HeadzooError(f"cannot read {folder / 'dataset.json'}: {error}") from None


@contextlib.contextmanager
def fake_world(problem: Problem):
    """Fake tensors, and CUDA's autocast kernels where the problem autocasts: yields the autocast region."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from headzoo.cuda_autocast import cuda_autocast_kernels

    with FakeTensorMode(), cuda_autocast_kernels() if problem.autocast else contextlib.nullcontext() as emulation:
        yield emulation.region if emulation is not None else contextlib.nullcontext


def build_fake_network(problem: Problem) -> torch.nn.Module:
    """The run's network, as `headzoo run` builds it (backbone table → nnU-Net's get_network_from_plans, head
    from the registry), under the active FakeTensorMode."""
    config = problem.config
    if config.options.get("kernel") == "triton":  # refused as asked, before the head would need triton installed
        raise HeadzooError(
            "kernel=triton cannot be estimated: its fused kernels run outside torch's dispatcher "
            "(estimate kernel=torch, which holds more)"
        )
    backbone, features = build_network(get_backbone(config.backbone)[0], problem.in_channels, config.seed)
    head = create_head(config.head, features, config.classes, **config.options)
    return attach_head(backbone, head)


def fake_batch(problem: Problem, batch: int | None = None) -> dict:
    """A training batch as nnU-Net's loader gives it: fp32 images, int16 labels, the annotated mask if partial."""
    config = problem.config
    b = batch or config.batch
    annotated = torch.ones(b, config.classes, dtype=torch.bool) if config.partial > 1 else None
    return {
        "data": torch.empty(b, problem.in_channels, *config.patch),
        "target": torch.zeros(b, 1, *config.patch, dtype=torch.int16),
        "annotated": annotated,
    }


def _fake_safe(head: str):
    """Run a fake estimate; an op that needs tensor values becomes one line naming the head."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedOperatorException,
    )

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException) as error:
            raise HeadzooError(
                f"the {head} head is not fake-safe (it needs tensor values: "
                f"{type(error).__name__} {str(error).splitlines()[0] if str(error) else ''}); "
                "headzoo estimate cannot run it"
            ) from None

    return guard()


PARTS = ("training_step", "loss", "inference_patch", "inference_volume")


class _FakeRun:
    """One fake world and one fake network for the estimates of a problem (building ResEnc-L takes seconds)."""

    def __init__(self, problem: Problem, region):
        self.problem, self.region = problem, region
        self.network = build_fake_network(problem)
        self.called: set | None = None  # the modules a forward calls (found by the first forward)

    def _hooked_forward(self, image):
        hooks = (
            [m.register_forward_pre_hook(lambda module, args: self.called.add(module)) for m in self.network.modules()]
            if self.called is None
            else []
        )
        self.called = set() if self.called is None else self.called
        try:
            return self.network(image)
        finally:
            for hook in hooks:
                hook.remove()

    def training_step(self) -> Peak:
        """One training step (after warm-up: the optimizer holds its state) as `headzoo run` measures it."""
        from headzoo.training import TrainStep, build_optimizer

        config, network, region = self.problem.config, self.network, self.region
        batch = fake_batch(self.problem)
        network.train()
        if self.called is None:
            with torch.no_grad():
                self._hooked_forward(batch["data"])
        optimizer = build_optimizer(network, config.steps, config.lr)
        optimizer.train()
        # the state the warm-up steps leave: one optimizer step on zero gradients for the parameters of every module
        # the forward calls (a module the forward never calls gets no gradient, so no state)
        for module in self.called:
            for parameter in module.parameters(recurse=False):
                parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        class FakeStep(TrainStep):
            def autocast_region(self):
                return region()

            def record_loss(self, loss):
                pass  # fake: no value to read back

        step = FakeStep(config, network, optimizer, torch.device("cpu"))
        tensors = [t for t in batch.values() if t is not None]
        return track_peak(lambda: step(batch), network, optimizer, *tensors)

    def loss(self) -> Peak:
        """The head's loss alone, forward and backward, from its output (b, K, *patch) as the step's forward gives
        it (the chunked-basis paper's loss profile, with the head's own loss)."""
        config, head, region = self.problem.config, head_of(self.network), self.region
        batch = fake_batch(self.problem)
        with torch.no_grad(), region():
            shape = head(torch.empty(config.batch, head.in_channels, *config.patch))
        output = torch.empty(shape.shape, dtype=shape.dtype).requires_grad_()
        del shape

        def loss_only():
            with region():
                loss = head.loss(output, batch["target"], batch["annotated"])
            loss.backward()

        tensors = [t for t in (batch["target"], batch["annotated"]) if t is not None]
        return track_peak(loss_only, head, output, *tensors)

    def inference_patch(self) -> Peak:
        """One patch at batch 1, in eval mode under the step's autocast (nnU-Net's predictor autocasts on CUDA):
        forward and head.predict."""
        network, region = self.network.eval(), self.region
        image = torch.empty(1, self.problem.in_channels, *self.problem.config.patch)

        def one_patch():
            with torch.no_grad(), region():
                head_of(network).predict(self._hooked_forward(image))

        return track_peak(one_patch, network, image)

    def inference_volume(self) -> Peak:
        """A whole `problem.volume` by headzoo's `sliding_window_output` (its fp32 K-channel accumulator over every
        window, the network under the step's autocast), then head.predict."""
        from headzoo.inference import sliding_window_output

        network, region = self.network.eval(), self.region
        volume = torch.empty(self.problem.in_channels, *self.problem.volume)

        def whole_volume():
            with (
                mock.patch("nnunetv2.inference.sliding_window_prediction.compute_gaussian", _stand_in_gaussian),
                torch.no_grad(),
                region(),
            ):
                head_of(network).predict(sliding_window_output(network, volume, self.problem.config.patch)[None])

        return track_peak(whole_volume, network, volume)


def _stand_in_gaussian(
    tile_size, sigma_scale=1.0 / 8, value_scaling_factor=1, dtype=torch.float16, device=torch.device("cuda", 0)
):
    """nnU-Net's compute_gaussian's result shape and dtype; its values (made with numpy and a boolean mask) are
    not needed for memory."""
    return torch.empty(tuple(tile_size), dtype=dtype, device=device)


def estimate_parts(problem: Problem, parts: tuple[str, ...] = PARTS) -> dict[str, Peak]:
    """The estimates `parts` of `problem` (each a method of one fake run), in one fake world."""
    with fake_world(problem) as region, _fake_safe(problem.config.head):
        run = _FakeRun(problem, region)
        ordered = sorted(parts, key=PARTS[::-1].index)  # inference first: its forward finds the called modules
        return {part: getattr(run, part)() for part in ordered}


def estimate_step(problem: Problem) -> Peak:
    return estimate_parts(problem, ("training_step",))["training_step"]


def estimate_loss(problem: Problem) -> Peak:
    return estimate_parts(problem, ("loss",))["loss"]


def estimate_inference(problem: Problem) -> tuple[Peak, Peak]:
    peaks = estimate_parts(problem, ("inference_patch", "inference_volume"))
    return peaks["inference_patch"], peaks["inference_volume"]


def estimate(problem: Problem) -> dict:
    """Every estimate of `problem`, as one JSON-able dict."""
    config = problem.config
    peaks = estimate_parts(problem)
    return {
        "head": config.head,
        "options": config.options,
        "classes": config.classes,
        "backbone": config.backbone,
        "patch": list(config.patch),
        "batch": config.batch,
        "amp": config.amp,
        "device_kind": problem.device_kind,
        "in_channels": problem.in_channels,
        "volume": list(problem.volume),
        "torch": torch.__version__,
        **{part: peak.as_dict() for part, peak in peaks.items()},
        "counts": "tensor bytes only (a lower bound of a GPU allocator's peak)",
    }
