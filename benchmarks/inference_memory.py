"""Peak memory and wall time of sliding-window prediction + export, nnU-Net's dense predictor vs headzoo's.

Each cell (head, C, volume) runs in its own process: the dense cell through nnU-Net's own
``nnUNetPredictor`` and ``export_prediction_from_logits`` (a C-channel buffer), the other heads through
``headzoo predict``'s ``HeadPredictor`` and ``export_head_prediction`` (K channels, ``head.predict`` at the
end). Network: nnU-Net's ResidualEncoderUNet, 2 stages of 8 and 16 features (random weights: memory
does not depend on them, and the network's own activations are the same for every head), patch
--patch³, step 0.5, no mirroring. Memory: on CPU the peak of live
torch tensors (torch's MemTracker) and the process's peak RSS growth (numpy buffers of the export
included); on CUDA the allocator's peak; both taken by headzoo.measure.measured. Memory the head holds
outside torch (a FAISS GPU index: ``Head.external_memory_bytes``) is recorded beside the peak. A cell over
--memory-limit (CPU address space, CUDA allocator cap) is recorded as ``oom``. Records:
leaderboard/inference_memory.jsonl (strict JSON lines, written atomically through headzoo.results; a rerun
replaces the cells it runs), rendered to inference_memory.md.

    python benchmarks/inference_memory.py --device cpu --memory-limit 12GiB
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from headzoo.errors import HeadzooError
from headzoo.results import json_lines, merge_records, strict_json, write_text_atomically

OUT = Path(__file__).resolve().parent.parent / "leaderboard"
VOLUMES = {"192³ (toy)": (192, 192, 192), "244×234×287 (TotalSegmentator, 1.5 mm)": (244, 234, 287)}
#: a cell's key: a rerun replaces the record with the same values of these
KEY = ("head", "classes", "shape", "patch", "device", "machine")


def light_architecture() -> dict:
    """headzoo's ``small`` ResEnc layout cut to 2 stages of 8 and 16 features: the buffers and the export under
    test do not depend on the network, and a light one keeps a 192³ CPU run to minutes."""
    from headzoo.backbone import BACKBONES

    architecture = copy.deepcopy(BACKBONES["small"][0])
    architecture["arch_kwargs"].update(
        n_stages=2,
        features_per_stage=[8, 16],
        kernel_sizes=[[3, 3, 3]] * 2,
        strides=[[1, 1, 1], [2, 2, 2]],
        n_blocks_per_stage=[1, 1],
        n_conv_per_stage_decoder=[1],
    )
    return architecture


def plans_and_dataset(classes: int, shape: tuple[int, ...], patch: int) -> tuple[dict, dict]:
    configuration = {
        "data_identifier": "bench",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [patch] * 3,
        "median_image_size_in_voxels": list(shape),
        "spacing": [1.5] * 3,
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": light_architecture(),
        "batch_dice": True,
    }
    plans = {
        "dataset_name": "Dataset999_Bench",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.5] * 3,
        "original_median_shape_after_transp": list(shape),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
    }
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{f"c{c}": c for c in range(1, classes)}},
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }
    return plans, dataset


def run_cell(head: str, classes: int, shape: tuple[int, ...], patch: int, device: str) -> dict:
    """One prediction + export; the measurements (this process does nothing else)."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from headzoo.measure import is_out_of_memory, measured
    from headzoo.backbone import head_of
    from headzoo.nnunet.network import build_head_network
    from headzoo.nnunet.predictor import HeadPredictor, export_head_prediction

    torch.manual_seed(0)
    plans, dataset = plans_and_dataset(classes, shape, patch)
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration("3d_fullres")
    network = build_head_network(configuration, 1, classes, head, {}).eval()
    predictor_class = nnUNetPredictor if head == "dense" else HeadPredictor
    predictor = predictor_class(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=torch.device(device), allow_tqdm=False
    )
    predictor.manual_initialization(
        network, plans_manager, configuration, [network.state_dict()], dataset, f"nnUNetTrainer_{head}", None
    )
    image = torch.randn(1, *shape)
    properties = {
        "spacing": [1.5] * 3,
        "shape_before_cropping": list(shape),
        "shape_after_cropping_and_before_resampling": list(shape),
        "bbox_used_for_cropping": [[0, s] for s in shape],
        "sitk_stuff": {"spacing": (1.5,) * 3, "origin": (0.0,) * 3, "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)},
    }

    def predict_and_export(folder: str) -> None:
        output = predictor.predict_logits_from_preprocessed_data(image).cpu()
        if head == "dense":  # nnU-Net's own export: argmax over the C channels
            export_prediction_from_logits(output, properties, configuration, plans_manager, dataset, f"{folder}/case")
        else:
            export_head_prediction(
                output, properties, configuration, plans_manager, dataset, f"{folder}/case", head_of(network)
            )

    record = {"head": head, "classes": classes, "shape": list(shape), "patch": patch, "device": device}
    with tempfile.TemporaryDirectory() as folder:
        try:  # the network is called once per window: only the total peak is kept
            with measured(device, network, repeated_modules=True) as measurement:
                predict_and_export(folder)
            record.update(
                status="ok",
                peak_bytes=measurement.peak_bytes,
                peak_kind=measurement.peak_kind,
                external_memory_bytes=head_of(network).external_memory_bytes(),
            )
        except Exception as error:  # noqa: BLE001 — an allocation refused under the budget is a result
            if not is_out_of_memory(error):
                raise
            record["status"] = "oom"
    record.update(seconds=measurement.seconds, rss_growth_bytes=measurement.rss_growth_bytes)
    return record


def gib(value) -> str:
    return f"{value / 2**30:.2f}" if isinstance(value, (int, float)) else "—"


def mib(value) -> str:
    return f"{value / 2**20:.0f}" if isinstance(value, (int, float)) else "—"


def render(records: list[dict]) -> str:
    made = sorted({(r["command"], r["machine"], r["torch"]) for r in records})
    lines = [
        "# Inference memory: sliding-window prediction + export",
        "",
        *[f"Made by `{command}` on {machine}, torch {version}." for command, machine, version in made],
        "Network: ResidualEncoderUNet, 2 stages (8, 16 features), random weights, "
        "step 0.5, no mirroring; dense = nnU-Net's `nnUNetPredictor` + `export_prediction_from_logits`, "
        "others = `headzoo predict`'s K-channel path. CPU peak = live torch tensors (MemTracker); "
        "RSS growth includes numpy buffers of the export; outside torch = memory the head holds outside "
        "torch's allocator (a FAISS GPU index; none on the CPU).",
        "",
        "| volume | head | C | device | status | peak GiB | outside torch MiB | RSS growth GiB | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        volume = next(
            (name for name, shape in VOLUMES.items() if list(shape) == r["shape"]), "×".join(map(str, r["shape"]))
        )
        ok = r["status"] == "ok"
        status = (
            r["status"]
            if ok
            else f"{r['status']} (fp16 C-channel buffer alone: {gib(r['classes'] * math.prod(r['shape']) * 2)} GiB)"
        )
        lines.append(
            f"| {volume} | {r['head']} | {r['classes']} | {r['device']} | {status} | "
            f"{gib(r.get('peak_bytes')) if ok else '—'} | {mib(r.get('external_memory_bytes')) if ok else '—'} "
            f"| {gib(r.get('rss_growth_bytes')) if ok else '—'} | {r['seconds']:.1f} |"
        )
    by_key = {
        (r["head"], r["classes"], tuple(r["shape"]), r["device"], r["machine"]): r
        for r in records
        if r["status"] == "ok"
    }
    for shape, device, machine in sorted({(tuple(r["shape"]), r["device"], r["machine"]) for r in records}):
        low, high = (by_key.get(("chunked", c, shape, device, machine)) for c in (100, 1000))
        if low and high:
            lines.append(
                f"\nchunked, {'×'.join(map(str, shape))}, {device}: peak at C = 1000 / C = 100 = "
                f"{high['peak_bytes'] / low['peak_bytes']:.3f}"
            )
    return "\n".join(lines) + "\n"


def read_records(path: Path) -> list[dict]:
    """The cells of a records file (none where it does not exist); a line that is not a cell is one line."""
    records = []
    for number, record in json_lines(path):
        if not isinstance(record, dict) or any(k not in record for k in (*KEY, "command", "torch", "status")):
            raise HeadzooError(
                f"{path}:{number} is not an inference-memory record (an object with "
                f"{', '.join(KEY)}, command, torch and status)"
            )
        records.append(record)
    return records


def write(new: list[dict], out: Path) -> None:
    """Merge `new` into out.jsonl (a cell replaces the record with its key) and render out.md."""
    merged = merge_records(out.with_suffix(".jsonl"), new, KEY, read_records)
    write_text_atomically(out.with_suffix(".md"), render(merged))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default="dense,chunked,knn")
    parser.add_argument("--classes", default="100,1000")
    parser.add_argument("--volumes", default=",".join(VOLUMES), help="names from VOLUMES, or AxBxC")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-limit", default=None, help="budget per cell, e.g. 12GiB")
    parser.add_argument(
        "--out", type=Path, default=OUT / "inference_memory", help="records go to OUT.jsonl, the table to OUT.md"
    )
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one cell, print JSON
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .jsonl")
    args = parser.parse_args()
    if args.cell:
        head, classes, shape = json.loads(args.cell)
        if args.memory_limit:
            from headzoo.budget import apply_memory_limit
            from headzoo.config import parse_bytes

            apply_memory_limit(parse_bytes(args.memory_limit), args.device)
        print(strict_json(run_cell(head, classes, tuple(shape), args.patch, args.device)), flush=True)
        os._exit(0)  # after an oom nnU-Net's window producer thread may be left blocked; do not wait for it
    read_records(args.out.with_suffix(".jsonl"))  # a file this cannot merge into fails now, not after the runs
    if args.render:
        write([], args.out)
        return
    volumes = [VOLUMES.get(v) or tuple(int(x) for x in v.split("x")) for v in args.volumes.split(",")]
    command = shlex.join(["python", "benchmarks/inference_memory.py", *sys.argv[1:]])
    made = {
        "command": command,
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
    }
    records = []
    for shape in volumes:
        for head in args.heads.split(","):
            for classes in (int(c) for c in args.classes.split(",")):
                cell = [
                    sys.executable,
                    __file__,
                    "--cell",
                    json.dumps([head, classes, shape]),
                    "--patch",
                    str(args.patch),
                    "--device",
                    args.device,
                    *(["--memory-limit", args.memory_limit] if args.memory_limit else []),
                ]
                result = subprocess.run(cell, capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"cell {head} C={classes} {shape} failed:\n{result.stderr[-3000:]}")
                records.append({**json.loads(result.stdout.strip().splitlines()[-1]), **made})
                print(records[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write(records, args.out)
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    try:
        main()
    except HeadzooError as error:
        raise SystemExit(f"error: {error}") from None
