import json

import pytest

from headzoo.leaderboard import render


def _record(head, classes, status="ok", **values):
    return {
        "head": head,
        "options": {},
        "classes": classes,
        "backbone": "small",
        "patch": [32, 32, 32],
        "batch": 2,
        "steps": 60,
        "seed": 0,
        "device_name": "cpu (test)",
        "status": status,
        "dice_mean": values.get("dice"),
        "peak_memory_bytes": values.get("memory"),
        "step_time_median_s": values.get("time"),
        "schema_version": 3,
        "dice_definition": "nnunet",
    }


@pytest.mark.slow  # renders every plot twice
def test_rendering_is_deterministic_and_shows_oom(tmp_path):
    results = tmp_path / "results.jsonl"
    records = [
        _record("dense", 10, dice=0.5, memory=2**20, time=0.1),
        _record("dense", 1000, status="oom"),
        _record("chunked", 10, dice=0.4, memory=2**19, time=0.2),
        _record("chunked", 1000, dice=0.1, memory=2**19, time=0.3),
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "board"
    first, second = ({p.name: p.read_bytes() for p in [render(results, out), *out.glob("*.png")]} for _ in range(2))
    assert first.keys() == second.keys() and len(first) == 4
    assert all(first[name] == second[name] for name in first)
    readme = first["README.md"].decode()
    assert "| dense | 0.500 | `oom` |" in readme and "| chunked | 0.400 | 0.100 |" in readme


@pytest.mark.slow  # renders the plots
def test_a_v3_row_without_a_patch_is_migrated_to_its_backbones_default_and_keeps_its_request(tmp_path):
    """A sweep's crash row from before schema 4 (e.g. rank=32 > C−1) reads with the small backbone's 32³ patch,
    its request the settings it was written with (patch null), so it is in its group's table."""
    from headzoo.results import read_records

    results = tmp_path / "results.jsonl"
    records = [
        _record("sigmoid", 100, dice=0.2, memory=2**20, time=0.1),
        {**_record("sigmoid", 10, status="error"), "patch": None},
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    ok, crashed = read_records(results)
    assert "request" not in ok and ok["schema_version"] == crashed["schema_version"] == 4
    assert crashed["patch"] == [32, 32, 32] and crashed["request"]["patch"] is None
    assert crashed["request"]["classes"] == 10 and crashed["request"]["head"] == "sigmoid"
    readme = render(results, tmp_path / "board").read_text()
    assert sum(line.startswith("### cpu") for line in readme.splitlines()) == 1
    assert "| sigmoid | `error` | 0.200 |" in readme


def test_runs_that_differ_in_steps_or_partial_labels_are_different_rows(tmp_path):
    from headzoo.results import read_records, upsert_record

    path = tmp_path / "results.jsonl"
    base = {**_record("dense", 10), "partial": 1}
    for record in (base, {**base, "steps": 500}, {**base, "partial": 3}, {**base, "dice_mean": 0.9}):
        upsert_record(path, record)
    assert [(r["steps"], r["partial"], r["dice_mean"]) for r in read_records(path)] == [
        (500, 1, None),
        (60, 3, None),
        (60, 1, 0.9),
    ]


@pytest.mark.slow  # renders the plots
def test_seeds_are_aggregated_and_curves_give_time_to_reach(tmp_path):
    results = tmp_path / "results.jsonl"

    def run(head, seed, final, reach_time):
        curve = [
            {"step": 10, "train_time_s": reach_time / 2, "dice_mean": final / 3, "dice_worst10_mean": 0.0},
            {"step": 20, "train_time_s": reach_time, "dice_mean": final, "dice_worst10_mean": 0.1},
        ]
        return {
            **_record(head, 100, dice=final, memory=2**20, time=0.1),
            "seed": seed,
            "curve": curve,
            "dice_worst10_mean": 0.1,
        }

    records = [
        run("dense", 0, 0.80, 100.0),
        run("dense", 1, 0.70, 120.0),
        run("chunked", 0, 0.60, 50.0),
        run("chunked", 1, 0.50, 60.0),
        {**run("chunked", 0, 0.002, 500.0), "classes": 1000},
    ]  # nothing learnt: no time to reach
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    readme = render(results, tmp_path / "board").read_text()
    assert "| dense | 0.750 [0.700–0.800] |" in readme and "| chunked | 0.550 [0.500–0.600] |" in readme
    assert "Seeds 0, 1" in readme and "Dice of the worst 10% of classes" in readme
    # D = 0.9 × 0.75: dense reaches it in both seeds (100 s and 120 s), chunked in neither
    assert "| head | C=100 (D=0.675) |" in readme
    assert "| dense | 110.00 s |" in readme and "| chunked | not reached (0/2) |" in readme
    assert "No time to reach at C=1000 (best final mean Dice 0.002)" in readme
    assert len(list((tmp_path / "board").glob("curve-C100-*.png"))) == 1


def test_the_headline_shows_the_protocol_first_with_each_heads_learning_rate_budget(tmp_path):
    from headzoo.protocol import ACCURACY_PROTOCOL, LARGE_C, LR_GRID, protocol_lr

    def protocol_run(head, lr, dice, seed=0, **extra):
        return {
            **_record(head, 100, dice=dice, memory=2**20, time=0.1),
            **ACCURACY_PROTOCOL,
            "lr": lr,
            "seed": seed,
            "grad_clip": 12.0,
            "warmup": 3,
            "amp": True,
            "partial": 1,
            **extra,
        }

    best = protocol_lr("dense")
    records = [protocol_run("dense", lr, 0.9 if lr == best else 0.5) for lr in LR_GRID]
    records += [
        protocol_run("dense", best, 0.7, seed=1),
        {**protocol_run("dense", best, 0.8, seed=2), "dice_definition": "pooled", "schema_version": 2},
    ]
    records += [{**_record("dense", 10, dice=0.3), "steps": 60}]  # not the protocol: under "All runs" only
    large = {**LARGE_C, "eval_every": 250}
    records += [
        {**protocol_run("chunked", protocol_lr("chunked"), dice, seed=seed), **large, "classes": 1000, "curve": curve}
        for seed, dice in ((0, 0.2), (1, 0.4))
        for curve in [
            [
                {"step": 250, "dice_mean": dice / 2, "train_time_s": 9.0},
                {"step": 500, "dice_mean": dice, "train_time_s": 18.0},
            ]
        ]
    ]
    records += [{**protocol_run("dense", 0.01, 0.9), **large, "classes": 1000}]  # not its rate: "All runs" only
    equal_steps = {**large, "steps": 500}  # the group's shorter runs: a row of their own, first
    records += [{**protocol_run("chunked", protocol_lr("chunked"), 0.05), **equal_steps, "classes": 1000}]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    readme = render(results, tmp_path / "board").read_text()
    headline, all_runs = readme.split("## All runs")
    assert "## Headline: the accuracy protocol" in headline and "### C = 100 · cpu (test)" in headline
    assert f"| dense | {best:g} | 2 | 0.800 [0.700–0.900] |" in headline  # the old Dice's row: not in the mean
    assert "0.800 [0.700–0.900]†" in all_runs
    assert "C = 10 ·" not in headline and "### cpu (test) · " in all_runs
    c1000 = headline[
        headline.index("### C = 1000 · cpu (test) · preset protocol1000") : headline.index("### Learning-rate budget")
    ]
    rate, steps = protocol_lr("chunked"), LARGE_C["steps"]
    assert f"| chunked · {steps} steps | {rate:g} | 2 | 0.300 [0.200–0.400] |" in c1000 and "| dense" not in c1000
    assert c1000.index(f"| chunked · 500 steps | {rate:g} | 1 | 0.050 |") < c1000.index(f"| chunked · {steps} steps")
    assert "![Learning curves C=1000](curve-C1000-" in c1000
    cells = ["**0.900**" if lr == best else "0.500" for lr in LR_GRID]
    assert "| dense | " + " | ".join(cells) + " |" in headline
