"""The typed config: defaults, YAML + overrides, clear errors naming the key."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import Config, ConfigError, build_config, load_config, parse_override


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = build_config()
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "train": {"lr": 0.5, "total_images": 10}}))
    cfg = load_config(path, ["train.lr=0.25", "model.channel_mult=[1, 2]"], defaults={"seed": 9})
    assert cfg.seed == 3  # file beats packaged defaults
    assert cfg.train.lr == 0.25  # override beats file
    assert cfg.train.total_images == 10
    assert cfg.model.channel_mult == [1, 2]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("train.lr=-1", "'train.lr'"),
        ("data.coupling=sinkhorn", "'data.coupling'"),
        ("data.channels=2", "'data.channels'"),
        ("model.channel_mult=[]", "channel_mult"),
        ("train.lr", "key.path=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        build_config(overrides=[override])
    assert needle in str(info.value)


def test_unknown_key_lists_what_is_allowed():
    with pytest.raises(ConfigError, match=r"allowed here: .*total_images"):
        build_config({"train": {"total_imgs": 5}})


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_values_parse_as_yaml():
    assert parse_override("train.compile=true") == (["train", "compile"], True)
    assert parse_override("sample.label=null") == (["sample", "label"], None)
    assert parse_override("tracking.uri=http://127.0.0.1:5000") == (
        ["tracking", "uri"],
        "http://127.0.0.1:5000",
    )


def test_flat_params_have_one_entry_per_leaf_and_no_credential_fields():
    flat = Config().flat()
    assert flat["train.lr"] == Config().train.lr
    assert not any("secret" in key or "access_key" in key or "password" in key for key in flat)


def test_assignment_is_validated():
    cfg = Config()
    with pytest.raises(ValueError):
        cfg.train.lr = -1.0


# --------------------------------------------------------------------------- packaged job defaults
# Values a job's YAML restates on purpose although pipeline/config.py has the same default.
PINNED = {
    ("gpu", "model.num_res_blocks"),  # the network behind docs/benchmarks.md's figures
    ("reflow", "train.lr"),  # layered over train.yaml: undoes its 1e-3 for a fine-tune
}


def _job_configs() -> list[str]:
    from importlib import resources

    folder = resources.files("jobs").joinpath("configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("name", _job_configs())
def test_job_yaml_holds_only_real_differences_from_the_library(name):
    """One copy of each default: a job's YAML sets what it deliberately sets differently."""
    from jobs._common import packaged_defaults
    from pipeline.config import _flatten

    library = Config().flat()
    job = build_config(packaged_defaults(name)).flat()  # validates it, too
    for key in _flatten(packaged_defaults(name)):
        if (name, key) not in PINNED:
            assert job[key] != library[key], (
                f"jobs/configs/{name}.yaml restates {key}={job[key]!r} (pipeline/config.py's)"
            )


@pytest.mark.parametrize("name", _job_configs())
def test_every_job_yaml_value_says_why(name):
    from importlib import resources

    text = resources.files("jobs").joinpath("configs", f"{name}.yaml").read_text()
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        if ":" in code and code.split(":", 1)[1].strip():  # a leaf `key: value`
            assert "#" in line, f"jobs/configs/{name}.yaml: no comment on {line.strip()!r}"


def test_job_defaults_layer_in_order():
    from jobs._common import packaged_defaults

    train, retrain = packaged_defaults("train"), packaged_defaults("train", "retrain")
    assert retrain["model"] == train["model"]  # retrain's from-scratch network is train's
    own = packaged_defaults("retrain")["train"]["lr"]
    assert retrain["train"]["lr"] == own != train["train"]["lr"]
