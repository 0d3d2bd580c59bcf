"""Every job's command line: key.path=value overrides before, between and after the flags,
a flag and an override of the same key refused, anything else refused by argparse.

In-process through ``fmpipe <job> ... --print-config`` (``jobs.cli.main``): the resolved
config is read back from stdout, so nothing is trained, prepared or sampled.
"""

from __future__ import annotations

import pytest
import yaml

from jobs import cli
from pipeline.config import Config, build_config


def _printed(capsys, argv: list[str]) -> Config:
    assert cli.main(argv) == 0, capsys.readouterr().err
    return build_config(yaml.safe_load(capsys.readouterr().out))


# job argv (overrides first, between and after the flags) -> expected (key, value) pairs
CASES = {
    "train": (
        [
            "train",
            "train.cpus_per_worker=0.5",
            "--images",
            "2000",
            "seed=3",
            "--workers",
            "2",
            "--print-config",
            "train.lr=0.01",
        ],
        {
            "train.cpus_per_worker": 0.5,
            "train.total_images": 2000,
            "seed": 3,
            "train.num_workers": 2,
            "train.lr": 0.01,
        },
    ),
    "sample": (
        [
            "sample",
            "sample.steps=8",
            "--model",
            "models:/m@a",
            "sample.solver=heun",
            "--num-samples",
            "5",
            "--print-config",
            "seed=2",
        ],
        {
            "sample.steps": 8,
            "sample.model": "models:/m@a",
            "sample.solver": "heun",
            "sample.num_samples": 5,
            "seed": 2,
        },
    ),
    "prepare": (
        [
            "prepare",
            "prepare.image_format=jpg",
            "--source",
            "synthetic:shapes",
            "prepare.parallel_threshold=9",
            "--num-samples",
            "7",
            "--print-config",
        ],
        {
            "prepare.image_format": "jpg",
            "prepare.source": "synthetic:shapes",
            "prepare.parallel_threshold": 9,
            "prepare.num_samples": 7,
        },
    ),
    "index": (
        [
            "index",
            "data.label_source=json",
            "--data",
            "s3://b/train-{000..009}.tar",
            "data.val_fraction=0.1",
            "--index",
            "./i.json",
            "--print-config",
        ],
        {
            "data.label_source": "json",
            "data.uri": "s3://b/train-{000..009}.tar",
            "data.val_fraction": 0.1,
            "data.index_uri": "./i.json",
        },
    ),
    "retrain": (
        [
            "retrain",
            "retrain.promote_margin=0.01",
            "--images",
            "300",
            "train.lr=1e-4",
            "--print-config",
        ],
        {"retrain.promote_margin": 0.01, "retrain.images": 300, "train.lr": 1e-4},
    ),
    "toy": (
        [
            "toy",
            "sample.num_samples=10",
            "--images",
            "100",
            "toy.target=8gaussians",
            "--print-config",
        ],
        {"sample.num_samples": 10, "train.total_images": 100, "toy.target": "8gaussians"},
    ),
    "demo": (
        ["demo", "sample.num_samples=10", "--print-config", "train.total_images=500"],
        {"sample.num_samples": 10, "train.total_images": 500},
    ),
    "bench-train": (
        [
            "bench",
            "train",
            "data.batch_size=16",
            "--images",
            "64",
            "train.lr=0.01",
            "--print-config",
        ],
        {"data.batch_size": 16, "train.lr": 0.01},
    ),
    "bench-sample": (
        ["bench", "sample", "sample.seed=4", "--steps", "3", "--print-config", "seed=1"],
        {"sample.seed": 4, "sample.steps": 3, "seed": 1},
    ),
    "bench-gpu": (
        ["bench", "gpu", "train.precision=fp32", "--steps", "4", "--print-config", "seed=1"],
        {"train.precision": "fp32", "seed": 1},
    ),
    "bench-toy": (
        ["bench", "toy", "seed=5", "--num-samples", "3", "--print-config"],
        {"seed": 5, "model.kind": "mlp"},
    ),
}


@pytest.mark.parametrize("job", sorted(CASES))
def test_overrides_before_between_and_after_flags(job, capsys):
    argv, expected = CASES[job]
    flat = _printed(capsys, argv).flat()
    assert {key: flat[key] for key in expected} == expected


def test_a_lone_override_before_the_flags(capsys):
    """The issue's own example."""
    flat = _printed(
        capsys, ["train", "train.cpus_per_worker=0.5", "--images", "2000", "--print-config"]
    ).flat()
    assert (flat["train.cpus_per_worker"], flat["train.total_images"]) == (0.5, 2000)


def test_the_same_override_twice_the_later_wins(capsys):
    flat = _printed(
        capsys, ["train", "train.lr=1", "--images", "5", "train.lr=2", "--print-config"]
    ).flat()
    assert flat["train.lr"] == 2


def test_a_flag_value_of_override_form_stays_the_flags(capsys):
    cfg = _printed(capsys, ["train", "--run-name", "a.b=c", "--print-config"])
    assert cfg.train.run_name == "a.b=c"


@pytest.mark.parametrize(
    ("argv", "flag", "key"),
    [
        (["train", "--images", "2000", "train.total_images=5"], "--images", "train.total_images"),
        (["train", "train.num_workers=3", "--workers", "2"], "--workers", "train.num_workers"),
        (["sample", "sample.steps=4", "--steps", "8"], "--steps", "sample.steps"),
        (["prepare", "seed=1", "--seed", "2"], "--seed", "seed"),
        (["retrain", "--images", "9", "retrain.images=10"], "--images", "retrain.images"),
        (["toy", "--out", "/tmp/x", "toy.out=/tmp/y"], "--out", "toy.out"),
        (["bench", "sample", "--steps", "3", "sample.steps=4"], "--steps", "sample.steps"),
    ],
)
def test_a_flag_and_an_override_of_one_key_is_a_config_error(argv, flag, key, capsys):
    assert cli.main([*argv, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"'{key}' is given twice" in err and flag in err


@pytest.mark.parametrize(
    ("argv", "token"),
    [
        (["train", "--images", "5", "oops"], "oops"),
        (["train", "oops", "--images", "5"], "oops"),
        (["sample", "--bogus", "1"], "--bogus"),
        (["prepare", "1=2"], "1=2"),  # a key must start with a letter
        (["bench", "data", "seed=1"], "seed=1"),  # bench data takes no config
    ],
)
def test_anything_else_is_argparses_unrecognized_arguments(argv, token, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--print-config"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and token in err


def test_gpus_per_worker_takes_0_or_1(capsys):
    assert not _printed(capsys, ["train", "--gpus-per-worker", "0", "--print-config"]).train.use_gpu
    assert _printed(capsys, ["train", "--gpus-per-worker", "1", "--print-config"]).train.use_gpu
    with pytest.raises(SystemExit):
        cli.main(["train", "--gpus-per-worker", "2", "--print-config"])
    assert "--gpus-per-worker" in capsys.readouterr().err


def test_train_alias_flag_sets_train_alias(capsys):
    cfg = _printed(capsys, ["train", "--alias", "champion", "--print-config"])
    assert cfg.train.alias == "champion"
    assert cfg.train.registered_model_name == "digits"  # what the alias is of


def test_retrain_inherits_the_train_jobs_network(capsys):
    """retrain.yaml layers on train.yaml: a from-scratch candidate is the digits network."""
    train = _printed(capsys, ["train", "--print-config"])
    retrain = _printed(capsys, ["retrain", "--print-config"])
    assert retrain.model == train.model and retrain.data == train.data
    assert retrain.train.registered_model_name == train.train.registered_model_name == "digits"
    assert retrain.train.lr < train.train.lr  # its own setting: it continues trained weights


def test_given_keys_are_the_flags_overrides_and_config_file_keys_the_user_set(tmp_path):
    """What a job must not replace with a default of its own (fmpipe sample: a model's own
    sampling rule applies only when neither sample.solver nor sample.steps was given)."""
    from jobs import sample as sample_job
    from jobs._common import given_keys, parse_job_args

    def keys(*argv):
        args = parse_job_args(sample_job.build_parser(), list(argv))
        return given_keys(args, sample_job.SHORTCUTS)

    assert keys("--model", "m") == {"sample.model"}
    assert keys("--steps", "4") == {"sample.steps"}
    assert keys("sample.solver=heun", "--out", "o") == {"sample.solver", "sample.out"}
    config = tmp_path / "c.yaml"
    config.write_text("sample:\n  steps: 8\ntrain:\n  lr: 0.1\n")
    assert keys("--config", str(config)) == {"sample.steps", "train.lr"}
