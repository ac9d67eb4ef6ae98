"""The ResNet-50 example and benchmark, run end to end as a user runs them (tiny sizes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("torchvision")


def run_script(args, timeout):
    python_path = [str(ROOT / "python")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(python_path)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_resnet50_example_equals_the_single_device_run(schedule):
    pytest.importorskip("tqdm")
    # 10 images in 3 micro-batches: uneven micro-batches, two SGD steps, two CPU stages.
    result = run_script(["examples/resnet50_pipeline.py", "--devices", "cpu", "cpu",
                         "--image-size", "32", "--batch", "10", "--chunks", "3", "--steps", "2",
                         "--classes", "10", "--schedule", schedule, "--json"], timeout=180)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])

    assert numbers["devices"] == ["cpu", "cpu"]
    assert len(numbers["balance"]) == 2 and min(numbers["balance"]) >= 1
    assert numbers["images_per_s"] > 0
    assert 0.0 <= numbers["bubble_fraction"] < 1.0
    assert len(numbers["loss"]) == len(numbers["baseline_loss"]) == 2
    # On CPU the baseline runs every operator as a stage does and accumulates the
    # micro-batch gradients in the same order, so it should agree to the last bit; the
    # tolerance only leaves room for rounding (a wrong gradient moves these by far more).
    loss_scale = max(abs(v) for v in numbers["baseline_loss"])
    assert numbers["max_loss_difference"] <= 1e-6 * loss_scale
    assert numbers["max_parameter_difference"] <= 1e-6 * numbers["max_parameter_magnitude"]
    assert numbers["max_buffer_difference"] <= 1e-5
    assert "largest difference from the one-device baseline" in result.stdout


def test_resnet50_benchmark_runs_every_way_and_writes_its_plots(tmp_path):
    pytest.importorskip("matplotlib")
    result = run_script(["benchmarks/resnet50.py", "--devices", "cpu", "cpu", "--batch", "8",
                         "--image-size", "32", "--batches", "1", "--repeats", "1",
                         "--chunks", "1", "2", "--classes", "10", "--out", str(tmp_path)],
                        timeout=240)
    assert result.returncode == 0, result.stderr
    ways = ["single device (2 threads)", "single device, 1 thread", "naive split",
            "hand-written", "shardpipe gpipe", "shardpipe 1f1b", "torch pipelining"]
    table = result.stdout.splitlines()
    for way in ways:
        assert any(line.startswith(way) and line.rstrip().endswith("x") for line in table), way
    for name in ["resnet50_ways.png", "resnet50_split_size.png", "resnet50_timeline_gpipe.png",
                 "resnet50_timeline_1f1b.png"]:
        path = tmp_path / name
        assert path.exists(), name
        assert path.stat().st_size > 5000, f"{name} is nearly empty"
    trace = json.loads((tmp_path / "resnet50_timeline_1f1b.json").read_text())
    assert {e["cat"] for e in trace["traceEvents"]} == {"forward", "backward"}


def test_pipeline_benchmark_prints_its_table_and_timeline(tmp_path):
    pytest.importorskip("matplotlib")
    result = run_script(["benchmarks/pipeline_bench.py", "--quick", "--out", str(tmp_path)],
                        timeout=180)
    assert result.returncode == 0, result.stderr
    assert "per-task cost" in result.stdout and "speed-up" in result.stdout
    assert "machine ceiling" in result.stdout
    timeline = tmp_path / "pipeline_timeline.png"
    assert timeline.exists() and timeline.stat().st_size > 5000
    events = json.loads((tmp_path / "pipeline_timeline.json").read_text())["traceEvents"]
    assert {e["cat"] for e in events} == {"forward", "backward"}
