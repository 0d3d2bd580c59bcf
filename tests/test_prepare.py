"""fmpipe prepare: sources, shard bytes, the dataset layout, re-runs, S3, Ray, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import pipeline.data.prepare as prepare_mod
import pipeline.storage as storage_mod
from jobs import prepare as prepare_job
from pipeline.config import PrepareConfig, build_config
from pipeline.data.manifest import MANIFEST_NAME, Manifest
from pipeline.data.prepare import prepare_dataset, split_indices
from pipeline.data.shards import TAR_MTIME, build_shard, encode_png_small, tar_header
from pipeline.data.sources import (
    SHAPE_KINDS,
    FolderSource,
    build_source,
    load_digits_arrays,
)
from pipeline.storage import Location, StorageError, boto3_client

REPO = Path(__file__).resolve().parents[1]


def config(**prepare):
    return build_config(overrides=[f"prepare.{k}={json.dumps(v)}" for k, v in prepare.items()])


def manifests(root: Path) -> dict[str, Manifest]:
    return {
        split: Manifest.from_json((root / split / MANIFEST_NAME).read_text())
        for split in ("train", "val")
    }


def read_webdataset(paths: list[Path]) -> list[dict]:
    """Every sample of the shards, read by the webdataset library itself."""
    urls = [f"file:{p}" for p in paths]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))


def shard_paths(root: Path, found: dict[str, Manifest]) -> list[Path]:
    return [root / split / s.name for split, m in found.items() for s in m.shards]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file: an atomic rewrite changes the inode."""
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return load_digits_arrays()[1]


# --------------------------------------------------------------------------- pieces


def test_tar_header_matches_tarfile() -> None:
    for name, size in [("00000001.png", 300), ("12345678.json", 0), ("a" * 100, 8**11 - 1)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, TAR_MTIME, 0o644
        assert tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


@pytest.mark.parametrize("shape", [(16, 16), (48, 40), (8, 8, 3), (64, 64, 3)])
def test_small_png_round_trip(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    array[: shape[0] // 2] = 7  # a flat half and a noisy half
    decoded = np.asarray(Image.open(io.BytesIO(encode_png_small(array))))
    assert decoded.shape == array.shape and (decoded == array).all()


def test_digits_arrays_equal_sklearn() -> None:
    from sklearn.datasets import load_digits

    images, labels = load_digits_arrays()
    digits = load_digits()
    assert (images == digits.images).all() and (labels == digits.target).all()


def test_split_is_seeded_permutation() -> None:
    a = split_indices(1797, 0.1, seed=0)
    assert len(a["val"]) == round(0.1 * 1797) and len(a["train"]) == 1797 - len(a["val"])
    assert sorted(np.concatenate([a["train"], a["val"]]).tolist()) == list(range(1797))
    b = split_indices(1797, 0.1, seed=0)
    c = split_indices(1797, 0.1, seed=1)
    assert (a["val"] == b["val"]).all() and not (a["val"] == c["val"]).all()
    assert len(split_indices(5, 0.0, 0)["val"]) == 0
    assert len(split_indices(3, 0.99, 0)["train"]) == 1  # never an empty train split


def test_unknown_source_lists_forms() -> None:
    with pytest.raises(ValueError, match=r"unknown source 'mnist'.*digits, folder:PATH"):
        build_source("mnist", PrepareConfig(), 0)
    with pytest.raises(ValueError, match="synthetic:shapes"):
        build_source("synthetic:blobs", PrepareConfig(), 0)
    with pytest.raises(ValueError, match="allowed forms"):
        build_source("folder:", PrepareConfig(), 0)
    # A path or an address given bare: the line says how to write it.
    with pytest.raises(ValueError, match=r"\(a folder of images: folder:/data/cats\)$"):
        build_source("/data/cats", PrepareConfig(), 0)
    with pytest.raises(ValueError, match=r"images there: folder:s3://b/x; WebDataset shards"):
        build_source("s3://b/x", PrepareConfig(), 0)
    with pytest.raises(ValueError) as plain:
        build_source("mnist", PrepareConfig(), 0)
    assert "(" not in str(plain.value)  # no hint where the spec looks like neither


# --------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_deterministic_and_independent() -> None:
    cfg = PrepareConfig(num_samples=400, resolution=32, channels=3)
    settings = dict(split="train", resolution=32, channels=3)
    a = build_source("synthetic:shapes", cfg, seed=3)
    b = build_source("synthetic:shapes", cfg, seed=3)
    c = build_source("synthetic:shapes", cfg, seed=4)
    data_a, build_a = build_shard(a, range(100, 200), **settings)
    # b generates other indices first: image i depends only on (seed, i)
    build_shard(b, range(0, 100), **settings)
    data_b, _ = build_shard(b, range(100, 200), **settings)
    data_c, _ = build_shard(c, range(100, 200), **settings)
    assert data_a == data_b and data_a != data_c and build_a.num_samples == 100
    # a subrange of a shard holds exactly the same members as the bigger shard
    with tarfile.open(fileobj=io.BytesIO(data_a)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    sub, _ = build_shard(a, range(150, 160), **settings)
    with tarfile.open(fileobj=io.BytesIO(sub)) as tar:
        for member in tar.getmembers():
            assert tar.extractfile(member).read() == members[member.name]
    labels = {a.load(i)[1] for i in range(400)}
    assert labels == set(range(len(SHAPE_KINDS)))
    image, _ = a.load(7)
    assert image.size == (32, 32) and len(set(image.getdata())) > 2


def test_synthetic_prepare_twice_same_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        cfg = config(
            source="synthetic:shapes", out=str(tmp_path / name), num_samples=300,
            resolution=16, channels=3, shard_size=100,
        )  # fmt: skip
        prepare_dataset(cfg, log=None)
    assert (
        manifests(tmp_path / "a")["train"].content_hash()
        == manifests(tmp_path / "b")["train"].content_hash()
    )
    samples = read_webdataset(sorted((tmp_path / "a" / "train").glob("*.tar")))
    assert len(samples) == 270
    assert all(s["png"].mode == "RGB" and s["png"].size == (16, 16) for s in samples)


def test_jpg_format(tmp_path: Path) -> None:
    cfg = config(
        source="synthetic:shapes", out=str(tmp_path), num_samples=50, resolution=24,
        channels=1, image_format="jpg", val_fraction=0.0,
    )  # fmt: skip
    prepare_dataset(cfg, log=None)
    samples = read_webdataset(sorted((tmp_path / "train").glob("*.tar")))
    assert len(samples) == 50 and all(s["jpg"].size == (24, 24) for s in samples)
    assert manifests(tmp_path)["train"].image_format == "jpg"


# --------------------------------------------------------------------------- digits, local


def check_digits_dataset(root: Path, labels: np.ndarray, resolution: int = 16) -> None:
    found = manifests(root)
    assert found["train"].num_samples + found["val"].num_samples == 1797
    assert found["val"].num_samples == round(0.1 * 1797)
    for split, manifest in found.items():
        assert manifest.split == split and manifest.class_names == [str(k) for k in range(10)]
        assert (manifest.resolution, manifest.channels) == (resolution, 1)
        for shard in manifest.shards:
            data = (root / split / shard.name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard.sha256
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                names = tar.getnames()
                png = Image.open(tar.extractfile(names[2]))  # key.cls, key.json, key.png
                assert png.mode == "L" and png.size == (resolution, resolution)
            assert names == sorted(names) and names[0].startswith(shard.first_key)
    seen: dict[str, str] = {}
    for split, manifest in found.items():
        samples = read_webdataset([root / split / s.name for s in manifest.shards])
        assert len(samples) == manifest.num_samples
        for sample in samples:
            key = sample["__key__"]
            assert key not in seen, f"key {key} twice"
            seen[key] = split
            index = int(key)
            assert sample["cls"] == labels[index] == sample["json"]["label"]
            assert sample["json"]["index"] == index and sample["json"]["split"] == split
            assert sample["json"]["label_name"] == str(labels[index])
            assert sample["png"].size == (resolution, resolution)  # "pil" decodes to RGB
    assert sorted(int(k) for k in seen) == list(range(1797))


def test_digits_local_then_rerun_and_repair(tmp_path: Path, digits_labels) -> None:
    root = tmp_path / "digits"
    cfg = config(source="digits", out=str(root), shard_size=400)
    first = prepare_dataset(cfg, log=None)
    assert not first.parallel and first.num_samples == 1797
    assert first.splits["train"].written == 5 and first.splits["val"].written == 1
    check_digits_dataset(root, digits_labels)
    # a digit is brighter in the middle than at the border
    sample = read_webdataset([root / "val" / "shard-000000.tar"])[0]["png"]
    pixels = np.asarray(sample.convert("L"), dtype=float)
    assert pixels.max() > 200 and pixels[6:10, 6:10].mean() > pixels[0].mean()

    before = snapshot(root)
    again = prepare_dataset(cfg, log=None)
    assert again.shards_written == 0 and again.shards_skipped == 6
    assert not any(s.manifest_written for s in again.splits.values())
    assert snapshot(root) == before  # nothing rewritten, not even the manifests

    # corrupt one shard in place (same size) and delete another: only those two come back
    corrupt = root / "train" / "shard-000001.tar"
    data = bytearray(corrupt.read_bytes())
    data[2000] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    (root / "val" / "shard-000000.tar").unlink()
    before = snapshot(root)
    repaired = prepare_dataset(cfg, log=None)
    assert repaired.splits["train"].written == 1 and repaired.splits["train"].skipped == 4
    assert repaired.splits["val"].written == 1
    after = snapshot(root)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"train/shard-000001.tar", "val/shard-000000.tar"}
    check_digits_dataset(root, digits_labels)
    assert not [p for p in root.rglob("*") if p.name.startswith(".fmpipe-tmp")]


def test_interrupted_run_resumes(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "d"
    cfg = config(source="digits", out=str(root), shard_size=300)
    real = prepare_mod.process_shard
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(prepare_mod, "process_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, log=None)
    assert (root / prepare_mod.PROGRESS_NAME).exists()
    assert not (root / "train" / MANIFEST_NAME).exists()
    monkeypatch.setattr(prepare_mod, "process_shard", real)
    resumed = prepare_dataset(cfg, log=None)
    assert resumed.shards_skipped == 2 and resumed.shards_written == 5
    assert not (root / prepare_mod.PROGRESS_NAME).exists()
    assert manifests(root)["train"].num_samples == 1617


def test_changed_settings_rebuild_and_drop_stale_shards(tmp_path: Path) -> None:
    root = tmp_path / "d"
    prepare_dataset(config(source="digits", out=str(root), shard_size=300), log=None)
    assert len(list((root / "train").glob("*.tar"))) == 6
    result = prepare_dataset(
        config(source="digits", out=str(root), shard_size=1000, resolution=8), log=None
    )
    assert result.shards_skipped == 0 and result.splits["train"].deleted == 4
    assert sorted(p.name for p in (root / "train").glob("*.tar")) == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert manifests(root)["train"].resolution == 8


def test_streamed_shards_are_identical(tmp_path: Path, monkeypatch) -> None:
    cfg = config(source="digits", out=str(tmp_path / "memory"), shard_size=500)
    prepare_dataset(cfg, log=None)
    monkeypatch.setattr(prepare_mod, "STREAM_THRESHOLD", 1)  # every shard via a temp file
    cfg = config(source="digits", out=str(tmp_path / "streamed"), shard_size=500)
    prepare_dataset(cfg, log=None)
    a, b = manifests(tmp_path / "memory"), manifests(tmp_path / "streamed")
    assert all(a[s].content_hash() == b[s].content_hash() for s in a)


# --------------------------------------------------------------------------- folder


def make_folder(root: Path) -> dict[str, str]:
    """Three classes, mixed formats, modes and sizes; returns {relative file: class}."""
    rng = np.random.default_rng(0)
    made: dict[str, str] = {}

    def save(rel: str, image: Image.Image, **kw) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **kw)
        made[rel] = rel.split("/")[0]

    def noise(size, mode):
        channels = {"RGB": 3, "RGBA": 4}.get(mode)
        shape = (size[1], size[0], channels) if channels else (size[1], size[0])
        return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)

    save("cat/a.png", noise((40, 30), "RGB"))
    save("cat/b.jpg", noise((17, 50), "RGB"), quality=90)
    save("cat/c.webp", noise((64, 64), "RGBA"))
    save("cat/nested/d.PNG", noise((20, 20), "L"))
    palette = noise((33, 21), "RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    save("dog/e.png", palette, transparency=0)
    save("dog/f.jpeg", noise((128, 96), "L"), quality=90)
    save("dog/g.bmp", noise((9, 9), "RGB"))
    save("zebra/h.png", noise((16, 16), "RGBA"))
    save("zebra/i.webp", noise((300, 200), "RGB"), lossless=True)
    save("zebra/j.gif", noise((25, 25), "RGB").convert("P"))
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "dog" / "notes.txt").write_text("not an image, not counted")
    (root / ".hidden").mkdir()
    return made


def test_folder_mixed_formats(tmp_path: Path) -> None:
    made = make_folder(tmp_path / "images")
    root = tmp_path / "out"
    cfg = config(
        source=f"folder:{tmp_path / 'images'}", out=str(root), resolution=16, channels=3,
        shard_size=4, val_fraction=0.2,
    )  # fmt: skip
    result = prepare_dataset(cfg, log=None)
    assert [u[0] for u in result.unreadable] == ["dog/broken.png"]
    found = manifests(root)
    assert found["train"].class_names == ["cat", "dog", "zebra"]
    assert found["train"].num_samples + found["val"].num_samples == len(made) == 10
    samples = read_webdataset(shard_paths(root, found))
    assert sorted(s["json"]["file"] for s in samples) == sorted(made)
    for sample in samples:
        assert sample["png"].size == (16, 16) and sample["png"].mode == "RGB"
        expected = made[sample["json"]["file"]]
        assert found["train"].class_names[sample["cls"]] == expected
        assert sample["json"]["label_name"] == expected


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds no images") as info:
        FolderSource(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        FolderSource(tmp_path / "nowhere")
    bad = tmp_path / "bad" / "x"
    bad.mkdir(parents=True)
    for name in ("a.png", "b.jpg"):
        (bad / name).write_bytes(b"garbage")
    cfg = config(source=f"folder:{tmp_path / 'bad'}", out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"none of the 2 images .*x/a\.png"):
        prepare_dataset(cfg, log=None)
    # unlabelled: images directly in the folder
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (10, 12), (200, 10, 10)).save(flat / "one.png")
    Image.new("L", (12, 10), 90).save(flat / "two.jpg")
    cfg = config(source=f"folder:{flat}", out=str(tmp_path / "flat-out"), val_fraction=0.0)
    prepare_dataset(cfg, log=None)
    samples = read_webdataset(sorted((tmp_path / "flat-out" / "train").glob("*.tar")))
    assert len(samples) == 2 and all("cls" not in s for s in samples)
    assert manifests(tmp_path / "flat-out")["train"].class_names == []


# --------------------------------------------------------------------------- S3


class WriteCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writes: list[str] = []
        for method in ("write_bytes", "upload_file"):
            original = getattr(Location, method)

            def counted(location, *args, _original=original, **kwargs):
                self.writes.append(location.uri)
                return _original(location, *args, **kwargs)

            monkeypatch.setattr(Location, method, counted)


def test_digits_to_s3_rerun_and_repair(
    s3_bucket: str, tmp_path: Path, monkeypatch, digits_labels
) -> None:
    # shards go up from temp files as multipart uploads
    monkeypatch.setattr(prepare_mod, "STREAM_THRESHOLD", 1)
    monkeypatch.setattr(storage_mod, "MULTIPART_THRESHOLD", 1024**2)
    uri = f"{s3_bucket}/datasets/digits"
    cfg = config(source="digits", out=uri, shard_size=1000)
    result = prepare_dataset(cfg, log=None)
    assert result.out == uri and result.num_samples == 1797

    client = boto3_client()
    bucket = s3_bucket.removeprefix("s3://")
    listing = client.list_objects_v2(Bucket=bucket, Prefix="datasets/digits/")
    keys = sorted(obj["Key"] for obj in listing["Contents"])
    assert keys == [
        "datasets/digits/train/_manifest.json",
        "datasets/digits/train/shard-000000.tar",
        "datasets/digits/train/shard-000001.tar",
        "datasets/digits/val/_manifest.json",
        "datasets/digits/val/shard-000000.tar",
    ]
    etag = client.head_object(Bucket=bucket, Key="datasets/digits/train/shard-000000.tar")["ETag"]
    assert "-" in etag  # a multipart upload's ETag: "<md5 of part md5s>-<parts>"
    local = tmp_path / "copy"
    for key in keys:
        path = local / key.removeprefix("datasets/digits/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    check_digits_dataset(local, digits_labels)

    counter = WriteCounter(monkeypatch)
    again = prepare_dataset(cfg, log=None)
    assert again.shards_written == 0 and again.shards_skipped == 3 and counter.writes == []

    key = "datasets/digits/train/shard-000001.tar"
    client.put_object(Bucket=bucket, Key=key, Body=b"truncated")
    repaired = prepare_dataset(cfg, log=None)
    assert repaired.shards_written == 1 and counter.writes == [f"{s3_bucket}/{key}"]
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == (local / "train" / "shard-000001.tar").read_bytes()


def test_missing_bucket_fails_before_work(s3_server, monkeypatch, capsys) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("the source was built before the output was checked")

    monkeypatch.setattr(prepare_mod, "build_source", no_work)
    cfg = config(source="digits", out="s3://no-such-bucket-fmpipe/x")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-fmpipe' does not exist"):
        prepare_dataset(cfg, log=None)
    code = prepare_job.main(["--source", "digits", "--out", "s3://no-such-bucket-fmpipe/x"])
    err = capsys.readouterr().err
    assert code != 0 and "no-such-bucket-fmpipe" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- Ray


def test_ray_tasks_give_identical_shards(tmp_path: Path) -> None:
    import ray

    serial = prepare_dataset(
        config(source="digits", out=str(tmp_path / "serial"), shard_size=300), log=None
    )
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        lines: list[str] = []
        cfg = config(
            source="digits", out=str(tmp_path / "ray"), shard_size=300, parallel_threshold=100
        )
        parallel = prepare_dataset(cfg, log=lines.append)
    finally:
        ray.shutdown()
    assert parallel.parallel and not serial.parallel
    assert any("shards 7/7 built" in line for line in lines)
    a, b = manifests(tmp_path / "serial"), manifests(tmp_path / "ray")
    for split in a:
        assert [(s.name, s.sha256) for s in a[split].shards] == [
            (s.name, s.sha256) for s in b[split].shards
        ]
        assert a[split].to_json() == b[split].to_json()


# --------------------------------------------------------------------------- CLI


def test_cli_help_and_bad_input(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        prepare_job.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--source", "--out", "--resolution", "--shard-size"))

    code = prepare_job.main(["--source", "bogus:thing", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code != 0 and "bogus:thing" in err and "digits" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()

    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    code = prepare_job.main(["--source", "digits", "--out", str(blocker / "ds")])
    err = capsys.readouterr().err
    assert code != 0 and str(blocker) in err and "Traceback" not in err

    code = prepare_job.main(["--source", "digits", "--resolution", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "prepare.resolution" in err

    code = prepare_job.main(
        ["--source", "digits", "--out", str(tmp_path / "ok"), "--shard-size", "2000"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "1,617 samples in 1 shard" in out


def test_cli_subprocess_bad_source() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "prepare", "--source", "nonsense"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2  # bad input
    assert "unknown source 'nonsense'" in done.stderr and "Traceback" not in done.stderr
    # The job's declared bad-input class is the user's input, said as its own text.
    assert "fmpipe prepare: error: unknown source 'nonsense'" in done.stderr, done.stderr
