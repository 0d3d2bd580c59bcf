"""The 2-D example end to end, and the command-line surface."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from jobs import cli
from jobs._common import packaged_defaults
from pipeline.config import build_config
from pipeline.data.toy import toy_sampler
from pipeline.eval.metrics import sliced_wasserstein2
from pipeline.toy2d import sample_toy, train_toy


def test_sliced_wasserstein_separates_distributions():
    generator = torch.Generator().manual_seed(0)
    moons_a = toy_sampler("moons")(4000, generator)
    moons_b = toy_sampler("moons")(4000, generator)
    normal = toy_sampler("normal")(4000, generator)
    assert sliced_wasserstein2(moons_a, moons_b) < 0.1 < sliced_wasserstein2(moons_a, normal)
    assert sliced_wasserstein2(moons_a, moons_a) == 0.0


def test_short_training_moves_samples_towards_the_target():
    cfg = build_config(
        packaged_defaults("toy"),
        ["train.total_images=150000", "train.warmup_images=5000", "data.batch_size=256"],
    )
    result = train_toy(cfg, log=lambda _: None)
    assert result.images_seen >= 150_000
    assert result.losses[-1] < result.losses[0]
    target = toy_sampler("moons")(3000, torch.Generator().manual_seed(7))
    source = toy_sampler("normal")(3000, torch.Generator().manual_seed(8))
    solution = sample_toy(result.model, cfg, 3000, seed=1, solver="euler", steps=16)
    assert solution.nfe == 16
    # trained samples are far closer to the moons than the source noise is
    assert sliced_wasserstein2(solution.x_1, target) < 0.5 * sliced_wasserstein2(source, target)


def test_same_seed_same_numbers():
    cfg = build_config(packaged_defaults("toy"), ["train.total_images=5120", "data.batch_size=512"])
    first = train_toy(cfg, log=lambda _: None)
    second = train_toy(cfg, log=lambda _: None)
    assert first.losses == second.losses
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_toy_job_writes_png_and_model(tmp_path, capsys):
    from jobs import toy

    code = toy.main(["--out", str(tmp_path), "--images", "20000", "sample.num_samples=500"])
    assert code == 0
    png = tmp_path / "toy2d.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(tmp_path / "toy2d.pt", weights_only=True)
    assert state["config"]["toy"]["target"] == "moons"
    assert "sliced W2" in capsys.readouterr().out


def test_bad_override_exits_2_with_the_key_named(capsys):
    from jobs import toy

    assert toy.main(["train.lr=-3"]) == 2
    assert "train.lr" in capsys.readouterr().err


@pytest.mark.parametrize("job", sorted(cli.JOBS))
def test_every_job_has_help(job):
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", job, "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_cli_lists_jobs_and_rejects_unknown(capsys):
    assert cli.main([]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in cli.JOBS)
    assert cli.main(["nosuchjob"]) == 2
    assert "unknown job 'nosuchjob'" in capsys.readouterr().err
