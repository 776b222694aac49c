"""Peak memory and wall time of sliding-window prediction + export, nnU-Net's dense predictor vs headzoo's.

Each cell (head, C, volume) runs in its own process: the dense cell through nnU-Net's own
``nnUNetPredictor`` and ``export_prediction_from_logits`` (a C-channel buffer), the other heads through
``headzoo predict``'s ``HeadPredictor`` and ``export_head_prediction`` (K channels, ``head.predict`` at the
end). Network: nnU-Net's ResidualEncoderUNet, 2 stages of 8 and 16 features (random weights: memory
does not depend on them, and the network's own activations are the same for every head), patch
--patch³, step 0.5, no mirroring. Memory: on CPU the peak of live
torch tensors (torch's MemTracker) and the process's peak RSS growth (numpy buffers of the export
included); on CUDA the allocator's peak. A cell over --memory-limit (CPU address space, CUDA allocator
cap) is recorded as ``oom``. Results: leaderboard/inference_memory.jsonl and .md.

    python benchmarks/inference_memory.py --device cpu --memory-limit 12GiB
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "leaderboard"
VOLUMES = {"192³ (toy)": (192, 192, 192), "244×234×287 (TotalSegmentator, 1.5 mm)": (244, 234, 287)}


def light_architecture() -> dict:
    """headzoo's ``small`` ResEnc layout cut to 2 stages of 8 and 16 features: the buffers and the export under
    test do not depend on the network, and a light one keeps a 192³ CPU run to minutes."""
    from headzoo.backbone import BACKBONES
    architecture = copy.deepcopy(BACKBONES["small"][0])
    architecture["arch_kwargs"].update(n_stages=2, features_per_stage=[8, 16], kernel_sizes=[[3, 3, 3]] * 2,
                                       strides=[[1, 1, 1], [2, 2, 2]], n_blocks_per_stage=[1, 1],
                                       n_conv_per_stage_decoder=[1])
    return architecture


def plans_and_dataset(classes: int, shape: tuple[int, ...], patch: int) -> tuple[dict, dict]:
    configuration = {
        "data_identifier": "bench", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [patch] * 3, "median_image_size_in_voxels": list(shape), "spacing": [1.5] * 3,
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": light_architecture(), "batch_dice": True,
    }
    plans = {"dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans",
             "original_median_spacing_after_transp": [1.5] * 3, "original_median_shape_after_transp": list(shape),
             "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {"3d_fullres": configuration}, "experiment_planner_used": "ExperimentPlanner",
             "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {}}
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{f"c{c}": c for c in range(1, classes)}},
               "numTraining": 0, "file_ending": ".nii.gz"}
    return plans, dataset


def total_peak_tracker():
    """torch's MemTracker for the total peak of live tensors only: its per-module statistics refuse a module
    called more than once, and sliding-window prediction calls the network once per window."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class TotalPeakTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs) -> None:
            pass

        def _post_fw_hook(self, module, inputs, outputs) -> None:
            pass

    return TotalPeakTracker()


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def run_cell(head: str, classes: int, shape: tuple[int, ...], patch: int, device: str) -> dict:
    """One prediction + export; the measurements (this process does nothing else)."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from headzoo.measure import is_out_of_memory
    from headzoo.nnunet.network import build_head_network, head_of
    from headzoo.nnunet.predictor import HeadPredictor, export_head_prediction

    torch.manual_seed(0)
    plans, dataset = plans_and_dataset(classes, shape, patch)
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration("3d_fullres")
    network = build_head_network(configuration, 1, classes, head, {}).eval()
    predictor_class = nnUNetPredictor if head == "dense" else HeadPredictor
    predictor = predictor_class(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=torch.device(device), allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration, [network.state_dict()], dataset,
                                    f"nnUNetTrainer_{head}", None)
    image = torch.randn(1, *shape)
    properties = {"spacing": [1.5] * 3, "shape_before_cropping": list(shape),
                  "shape_after_cropping_and_before_resampling": list(shape),
                  "bbox_used_for_cropping": [[0, s] for s in shape],
                  "sitk_stuff": {"spacing": (1.5,) * 3, "origin": (0.0,) * 3, "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}}

    def predict_and_export(folder: str) -> None:
        output = predictor.predict_logits_from_preprocessed_data(image).cpu()
        if head == "dense":  # nnU-Net's own export: argmax over the C channels
            export_prediction_from_logits(output, properties, configuration, plans_manager, dataset, f"{folder}/case")
        else:
            export_head_prediction(output, properties, configuration, plans_manager, dataset, f"{folder}/case",
                                   head_of(network))

    record = {"head": head, "classes": classes, "shape": list(shape), "patch": patch, "device": device}
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as folder:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                predict_and_export(folder)
                torch.cuda.synchronize()
                record["peak_bytes"], record["peak_kind"] = torch.cuda.max_memory_allocated(), "cuda_allocator"
            else:
                tracker = total_peak_tracker()
                tracker.track_external(network)
                with tracker:
                    predict_and_export(folder)
                record["peak_bytes"] = int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
                record["peak_kind"] = "cpu_live_tensors"
        record["status"] = "ok"
    except Exception as error:  # noqa: BLE001 — an allocation refused under the budget is a result
        if not is_out_of_memory(error):
            raise
        record["status"] = "oom"
    record["seconds"] = time.perf_counter() - start
    record["rss_growth_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return record


def gib(value) -> str:
    return f"{value / 2**30:.2f}" if isinstance(value, (int, float)) else "—"


def render(records: list[dict], command: str) -> str:
    lines = ["# Inference memory: sliding-window prediction + export", "",
             f"Made by `{command}` on {platform.node()} ({platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}). Network: ResidualEncoderUNet, 2 stages (8, 16 features), random weights, "
             "step 0.5, no mirroring; dense = nnU-Net's `nnUNetPredictor` + `export_prediction_from_logits`, "
             "others = `headzoo predict`'s K-channel path. CPU peak = live torch tensors (MemTracker); "
             "RSS growth includes numpy buffers of the export.", "",
             "| volume | head | C | status | peak GiB | RSS growth GiB | seconds |", "|---|---|---|---|---|---|---|"]
    for r in records:
        volume = next((name for name, shape in VOLUMES.items() if list(shape) == r["shape"]), "×".join(map(str, r["shape"])))
        ok = r["status"] == "ok"
        status = r["status"] if ok else f"{r['status']} (fp16 C-channel buffer alone: " \
            f"{gib(r['classes'] * math.prod(r['shape']) * 2)} GiB)"
        lines.append(f"| {volume} | {r['head']} | {r['classes']} | {status} | "
                     f"{gib(r.get('peak_bytes')) if ok else '—'} | {gib(r['rss_growth_bytes']) if ok else '—'} | "
                     f"{r['seconds']:.1f} |")
    by_key = {(r["head"], r["classes"], tuple(r["shape"])): r for r in records if r["status"] == "ok"}
    for shape in {tuple(r["shape"]) for r in records}:
        low, high = by_key.get(("chunked", 100, shape)), by_key.get(("chunked", 1000, shape))
        if low and high:
            lines.append(f"\nchunked, {'×'.join(map(str, shape))}: peak at C = 1000 / C = 100 = "
                         f"{high['peak_bytes'] / low['peak_bytes']:.3f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default="dense,chunked,knn")
    parser.add_argument("--classes", default="100,1000")
    parser.add_argument("--volumes", default=",".join(VOLUMES), help="names from VOLUMES, or AxBxC")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-limit", default=None, help="budget per cell, e.g. 12GiB")
    parser.add_argument("--out", type=Path, default=OUT / "inference_memory")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one cell, print JSON
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .jsonl")
    args = parser.parse_args()
    if args.render:
        lines = args.out.with_suffix(".jsonl").read_text().splitlines()
        command, records = json.loads(lines[0])["command"], [json.loads(line) for line in lines[1:]]
        args.out.with_suffix(".md").write_text(render(records, command))
        return
    if args.cell:
        head, classes, shape = json.loads(args.cell)
        if args.memory_limit:
            from headzoo.budget import apply_memory_limit
            from headzoo.config import parse_bytes
            apply_memory_limit(parse_bytes(args.memory_limit), args.device)
        print(json.dumps(run_cell(head, classes, tuple(shape), args.patch, args.device)), flush=True)
        os._exit(0)  # after an oom nnU-Net's window producer thread may be left blocked; do not wait for it
    volumes = [VOLUMES.get(v) or tuple(int(x) for x in v.split("x")) for v in args.volumes.split(",")]
    records = []
    for shape in volumes:
        for head in args.heads.split(","):
            for classes in (int(c) for c in args.classes.split(",")):
                cell = [sys.executable, __file__, "--cell", json.dumps([head, classes, shape]), "--patch",
                        str(args.patch), "--device", args.device,
                        *(["--memory-limit", args.memory_limit] if args.memory_limit else [])]
                result = subprocess.run(cell, capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"cell {head} C={classes} {shape} failed:\n{result.stderr[-3000:]}")
                records.append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(records[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/inference_memory.py " + shlex.join(sys.argv[1:])
    args.out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"command": command}, *records]))
    args.out.with_suffix(".md").write_text(render(records, command))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
