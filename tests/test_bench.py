"""`fmpipe bench train` and `fmpipe bench sample` at a tiny size: the tables come out whole.

Smoke tests only: they check that each benchmark runs in-process end to end and prints its
ratio lines with positive numbers, never how fast anything is (docs/design.md, "Testing").
One local Ray (2 CPUs) serves the module; the benchmarks find it running and leave it up.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from localray import local_ray
from tiny import tiny_unet_overrides

from jobs import bench
from pipeline.bench.gpu import gpu_throughput
from pipeline.bench.train import steady_state
from pipeline.checkpoint import TrainState, save_checkpoint
from pipeline.config import build_config
from pipeline.data.prepare import prepare_dataset
from pipeline.models import build_model
from pipeline.rayenv import scoped_environ
from pipeline.train.trainer import _format_progress

pytestmark = pytest.mark.slow

TINY_ARGS = tiny_unet_overrides()  # the tiny U-Net as model.<key>=<value> overrides
NUMBER = r"([\d,]+\.?\d*)"


def number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def ray_local():
    """Local Ray for this module (tests/localray.py), after the S3 env is set."""
    with local_ray(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional 8x8 U-Net checkpoint (random non-zero weights) whose config
    names a real digits dataset, so the quality table has real images to compare with."""
    root = tmp_path_factory.mktemp("bench-model")
    tree = {
        "prepare": {"source": "digits", "out": str(root / "digits"), "resolution": 8},
        "data": {"uri": str(root / "digits"), "resolution": 8, "channels": 1},
        "model": {"num_classes": 10},
    }
    cfg = build_config(tree, TINY_ARGS)
    prepare_dataset(cfg, log=None)
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 8, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the output conv starts at zero
    state = TrainState(images_seen=1, step=1, data_shape=[1, 8, 8])
    return save_checkpoint(root / "ckpt", model=model, ema=model, state=state, config=cfg)


def test_steady_state_reads_the_trainers_progress_lines():
    def line(seen: int, rate: float, wait: float) -> str:
        event = {"kind": "log", "images_seen": seen, "total_images": 512, "loss": 1.0,
                 "lr": 1e-3, "images_per_sec": rate, "data_wait_fraction": wait}  # fmt: skip
        return _format_progress(event)

    lines = ["[train] starting", line(128, 10.0, 0.9), line(384, 200.0, 0.1), line(512, 100.0, 0.4)]
    rate, wait, windows = steady_state(lines, warmup_images=128)
    # 256 images in 1.28 s and 128 images in 1.28 s: 150 images/s, waiting 0.25 of the time
    assert windows == 2
    assert rate == pytest.approx(150.0)
    assert wait == pytest.approx(0.25)


def test_reflow_bench_matches_quality_at_the_fewest_nfe_and_times_only_those():
    """`fmpipe bench reflow`'s verdict (pipeline.bench.reflow.matched_quality) on made-up
    sweeps: the target is the base's last FD; a curve's matched NFE is the fewest that
    reaches it; only those are timed; a curve that never reaches it has no ratio."""
    from pipeline.bench.reflow import Curve, matched_quality
    from pipeline.eval.job import SweepPoint
    from pipeline.eval.scores import Scores

    def curve(name: str, fds: dict[int, float]) -> Curve:
        points = [
            SweepPoint("euler", k, float(k), Scores("classifier", fd, 0, 0, 0, 0, 9, 9, 9, 9))
            for k, fd in fds.items()
        ]
        return Curve(name, f"models:/m-{name}/1", points)

    curves = [
        curve("base", {1: 4.5, 2: 0.9, 4: 0.35, 8: 0.21, 32: 0.17}),
        curve("2-RF", {1: 0.30, 2: 0.17, 4: 0.16, 8: 0.16, 32: 0.16}),  # reaches it at 2
        curve("student-1", {1: 0.21, 2: 0.29, 4: 0.35, 8: 0.37, 32: 0.40}),  # never does
    ]
    timed: list[tuple[str, int]] = []

    def rate(c: Curve, nfe: int) -> float:
        timed.append((c.name, nfe))
        return 320.0 / nfe  # samples/s of an NFE-bound sampler

    lines: list[str] = []
    figures = matched_quality(curves, rate, "2-RF", lines.append)
    assert figures["target_fd"] == 0.17
    assert (figures["base_nfe"], figures["2-RF_nfe"], figures["student-1_nfe"]) == (32, 2, None)
    assert timed == [("base", 32), ("2-RF", 2)]  # the student is not timed
    assert figures["speedup"] == pytest.approx(16.0) and figures["student_speedup"] is None
    text = "\n".join(lines)
    assert "student-1  does not reach it at 1, 2, 4, 8, 32 steps (best FD 0.2100 at 1 NFE)" in text
    assert "ratio 2-RF / base at equal quality: 16.00x (goal >= 8x)" in text


def test_reflow_bench_judges_the_mean_of_several_eval_seeds():
    """--eval-seeds: the verdict is on each point's mean over the seeds' sweeps (here seed 0
    alone would say the student reaches the base at 4 NFE, seed 1 that it misses; their
    mean misses by 2 %); sweeps of other points are refused."""
    from pipeline.bench.reflow import Curve, matched_quality, mean_over_seeds
    from pipeline.eval.job import SweepPoint
    from pipeline.eval.scores import ClassScore, Scores

    def sweep(fds: dict[str, dict[int, float]], recall: float) -> list[SweepPoint]:
        def scores(fd: float) -> Scores:
            return Scores("classifier", fd, 1e-3, 2e-3, 0.5, recall, 9, 9, 9, 9, 0.9, 0.8,
                          {0: ClassScore(1.0, 9)})  # fmt: skip

        return [SweepPoint("euler", k, float(k), scores(fd), model)
                for model, by_steps in fds.items() for k, fd in by_steps.items()]  # fmt: skip

    seed_0 = sweep({"base": {4: 0.36, 32: 0.117}, "student-4": {4: 0.115, 32: 0.16}}, 0.9)
    seed_1 = sweep({"base": {4: 0.31, 32: 0.075}, "student-4": {4: 0.081, 32: 0.12}}, 0.7)
    mean = mean_over_seeds([seed_0, seed_1])
    assert [(p.model, p.steps) for p in mean] == [(p.model, p.steps) for p in seed_0]
    assert [round(p.scores.fd, 6) for p in mean] == [0.335, 0.096, 0.098, 0.14]
    assert mean[0].scores.recall == pytest.approx(0.8) and mean[0].scores.per_class == {}
    assert mean[0].scores.accuracy == pytest.approx(0.9)

    def verdict(points: list[SweepPoint]) -> float | None:
        curves = [Curve(m, f"models:/{m}/1", [p for p in points if p.model == m])
                  for m in ("base", "student-4")]  # fmt: skip
        return matched_quality(curves, lambda c, nfe: 100.0 / nfe, "2-RF", lambda _: None)[
            "student-4_nfe"
        ]

    assert verdict(seed_0) == 4 and verdict(seed_1) is None
    assert verdict(mean) is None  # 0.098 > 0.096: misses on the mean
    with pytest.raises(ValueError, match="same models and steps"):
        mean_over_seeds([seed_0, seed_1[:3]])


def test_scoped_environ_sets_then_restores_exactly(monkeypatch: pytest.MonkeyPatch):
    import os

    monkeypatch.setenv("FMPIPE_TEST_KEPT", "before")
    monkeypatch.delenv("FMPIPE_TEST_NEW", raising=False)
    values = {"FMPIPE_TEST_KEPT": "during", "FMPIPE_TEST_NEW": "x"}
    # restored on the way out of an error too
    with pytest.raises(RuntimeError, match="inside"), scoped_environ(values):
        assert os.environ["FMPIPE_TEST_KEPT"] == "during"
        assert os.environ["FMPIPE_TEST_NEW"] == "x"
        raise RuntimeError("inside")
    assert os.environ["FMPIPE_TEST_KEPT"] == "before"
    assert "FMPIPE_TEST_NEW" not in os.environ


def test_mfu_code_path_runs_on_cpu():
    cfg = build_config({"data": {"resolution": 8, "channels": 1}}, TINY_ARGS)
    row = gpu_throughput(cfg, 16, 4, peak_flops=1e12, device="cpu", warmup=1, steps=1)
    assert row.images_per_sec > 0 and row.forward_gflops_per_image > 0
    assert math.isfinite(row.mfu) and row.mfu > 0


def test_bench_gpu_code_path_on_cpu_needs_no_ray(tmp_path: Path):
    """`fmpipe bench gpu` runs where only PyTorch and pydantic are (the H200 lease)."""
    out = tmp_path / "gpu.json"
    argv = ["gpu", "data.resolution=8", *TINY_ARGS, "--device", "cpu", "--resolutions", "8",
            "--train-batch", "4", "--block", "4", "--steps", "2", "--blocks", "1",
            "--no-compile", "--json", str(out)]  # fmt: skip
    code = (
        "import sys; from jobs import bench\n"
        f"rc = bench.main({argv!r})\n"
        "heavy = [m for m in ('ray', 'mlflow', 'webdataset', 'boto3', 'pyarrow') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
    figures = json.loads(out.read_text())
    assert [(r["resolution"], r["mode"]) for r in figures["train"]] == [
        (8, "eager"),
        (8, "eager+NHWC"),
    ]
    assert {(r["precision"], r["mode"]) for r in figures["sample"]} == {
        ("bf16", "eager"),
        ("fp32", "eager"),
    }
    assert all(
        r["images_per_sec"] > 0 and r["forward_gflops_per_image"] > 0 for r in figures["train"]
    )
    assert all(r["samples_per_sec"] > 0 for r in figures["sample"])
    assert figures["skipped"] == []


def test_bench_data_prints_the_ratio_table():
    """Own SeaweedFS and Ray (the S3 settings must reach Ray's workers): a subprocess. Its
    (c) is the training stream (the unit check of that: tests/test_stream.py)."""
    argv = [sys.executable, "-m", "jobs.cli", "bench", "data", "--resolutions", "8",
            "--num-samples", "300"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    numbers = r"\s+".join([NUMBER] * 9)
    row = re.search(rf"^\s+8\s+{numbers}\s*$", proc.stdout, re.M)
    assert row, proc.stdout
    ceiling, baseline, fmpipe, c_b, c_a, in_process, c_a2, per_epoch, c1_a = (
        number(v) for v in row.groups()
    )
    assert min(ceiling, baseline, fmpipe, in_process, per_epoch) > 0
    assert c_b == pytest.approx(fmpipe / baseline, abs=0.01)
    assert c_a == pytest.approx(fmpipe / (2 * ceiling), abs=0.01)
    assert c_a2 == pytest.approx(fmpipe / (2 * in_process), abs=0.01)
    assert c1_a == pytest.approx(per_epoch / (2 * ceiling), abs=0.01)
    assert "batch  512" in proc.stdout  # the ot cost table
    assert "(c) = the training stream (build_train_stream" in proc.stdout


def test_bench_train_prints_the_ratio_table(ray_local, capsys):
    argv = ["train", "--images", "512", "data.batch_size=32", "data.resolution=8", *TINY_ARGS]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    plain = re.search(rf"\(a\) plain PyTorch loop.*?\s{NUMBER}\s+{NUMBER}\s+-", out)
    fmpipe = re.search(rf"\(b\) fmpipe train.*?\s{NUMBER}\s+{NUMBER}\s+{NUMBER}%", out)
    ratio = re.search(rf"ratio b/a: {NUMBER} \(goal >= 0.95\)", out)
    assert plain and fmpipe and ratio, out
    assert all(number(v) > 0 for v in (*plain.groups(), *fmpipe.groups()[:2], ratio.group(1)))
    assert 0 <= number(fmpipe.group(3)) <= 100
    assert "16 steps = 512 images" in out
    if not torch.cuda.is_available():
        assert "GPU: skipped" in out


def test_bench_sample_prints_ratios_and_quality(ray_local, tiny_checkpoint, capsys):
    argv = ["sample", "--model", str(tiny_checkpoint), "--num-samples", "100", "--steps", "4"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    for label in ("(a) torchdiffeq", "(b) fmpipe sampler", "(c) fmpipe sample on Ray"):
        row = re.search(rf"{re.escape(label)}.*?\s{NUMBER}\s+{NUMBER}", out)
        assert row and number(row.group(1)) > 0 and number(row.group(2)) > 0, out
    b_a = re.search(rf"ratio b/a: {NUMBER} \(goal >= 1.0\)", out)
    c_ba = re.search(rf"ratio c/\(b\*A\): {NUMBER} \(goal >= 0.9\), A=1", out)
    assert b_a and c_ba, out
    assert number(b_a.group(1)) > 0 and number(c_ba.group(1)) > 0
    floor = re.search(rf"real vs real\s+-\s+{NUMBER}", out)
    assert floor and number(floor.group(1)) > 0, out
    assert "floor = the same distance between two disjoint real subsets" in out
    for name, nfe in (("euler 2", 2), ("euler 32", 32), ("midpoint 8", 16), ("heun 8", 16)):
        row = re.search(rf"^{name}\s+{NUMBER}\s+{NUMBER}", out, re.MULTILINE)
        assert row and number(row.group(1)) == nfe and number(row.group(2)) > 0, (name, out)
    assert re.search(rf"^dopri5\s+{NUMBER}\s+{NUMBER}", out, re.MULTILINE), out


def test_bench_sample_without_the_demo_model_says_what_to_do(capsys):
    assert bench.main(["sample"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "models:/digits@champion" in err and "make demo" in err and "--model" in err


def test_bench_data_foreign_prints_the_table_and_ratios():
    """`fmpipe bench data --foreign` tiny: its own SeaweedFS (or the session's, through the
    environment) and Ray, so a subprocess, as the data benchmark above."""
    argv = [sys.executable, "-m", "jobs.cli", "bench", "data", "--foreign", "--images", "40"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    rates = {}
    for label in ("(a)", "(a x 2)", "(b)", "(b')", "(c)"):
        row = re.search(rf"^\s+{re.escape(label)}\s.*?\s{NUMBER}\s*$", out, re.M)
        assert row, (label, out)
        rates[label] = number(row.group(1))
        assert rates[label] > 0, (label, out)
    assert rates["(a x 2)"] == pytest.approx(2 * rates["(a)"], rel=0.01, abs=1)
    c_b = re.search(rf"ratio c/b: {NUMBER} \(goal >= 1.0: (met|NOT met)\)", out)
    c_a = re.search(rf"ratio c/\(a\*cores\): {NUMBER} \(goal >= 0.8: (met|NOT met)\)", out)
    index = re.search(rf"ratio index/GET: {NUMBER} \(goal >= 0.8: (met|NOT met)\)", out)
    assert c_b and c_a and index, out
    assert number(c_b.group(1)) == pytest.approx(rates["(c)"] / rates["(b)"], abs=0.02)
    assert number(c_a.group(1)) == pytest.approx(rates["(c)"] / rates["(a x 2)"], abs=0.02)
    for name in ("build_index", "raw GET x2"):
        row = re.search(rf"^\s+{re.escape(name)}\s+{NUMBER} shards/s\s+{NUMBER} MB/s", out, re.M)
        assert row and number(row.group(1)) > 0 and number(row.group(2)) > 0, (name, out)
    assert "40 photo-like JPEGs (128-512 px a side" in out


def test_bench_reflow_refuses_pair_steps_for_a_student_of_the_base(capsys):
    """--distill-pair-steps sets the reflowed teacher's new pairs; with --distill-from base
    (the base's own pairs) it would be ignored, so it is refused before any work."""
    assert bench.main(["reflow", "--distill-from", "base", "--distill-pair-steps", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: --distill-pair-steps") and "base's own pairs" in err


def test_bench_help_lists_every_benchmark_and_each_has_its_own(capsys):
    """`fmpipe bench --help` names each sub-command (its list once left out eval and
    reflow), and each answers --help with its own usage."""
    with pytest.raises(SystemExit) as done:
        bench.main(["--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.endswith("{" + ",".join(bench.BENCHES) + "} ...")
    assert {"toy", "data", "train", "sample", "eval", "reflow", "gpu"} == set(bench.BENCHES)
    for name in bench.BENCHES:
        with pytest.raises(SystemExit) as done:
            bench.main([name, "--help"])
        assert done.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: fmpipe bench {name} ")
