"""``fmpipe prepare`` from data fmpipe did not write, and never into it (issue 14).

- ``webdataset:ADDRESS``: another tool's shards (``webdataset.ShardWriter``) re-encoded at
  the prepare resolution, locally and from SeaweedFS; exact counts, label histogram, bad
  samples counted with reasons, nothing written under the source, same bytes twice;
- ``folder:`` with ``.cls`` side files, non-image files counted, and ``s3://`` folders;
- ``--out`` into a folder that holds another tool's shards is refused, writing nothing;
- the registered model's name defaults from the dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from foreign_data import PNG_L, _dataset, _samples, _write
from PIL import Image

from jobs import prepare as prepare_job
from pipeline.config import build_config, dataset_name
from pipeline.data.manifest import MANIFEST_NAME, Manifest
from pipeline.data.prepare import prepare_dataset
from pipeline.storage import StorageInputError, boto3_client


def config(**prepare):
    return build_config(overrides=[f"prepare.{k}={json.dumps(v)}" for k, v in prepare.items()])


def files(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def written(root: Path) -> list[dict]:
    paths = []
    for split in ("train", "val"):
        manifest = Manifest.from_json((root / split / MANIFEST_NAME).read_text())
        paths += [f"file:{root / split / s.name}" for s in manifest.shards]
    return list(wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode("pil"))


def s3_listing(bucket: str) -> list[tuple[str, str]]:
    page = boto3_client().list_objects_v2(Bucket=bucket.removeprefix("s3://"))
    return sorted((o["Key"], o["ETag"]) for o in page.get("Contents", []))


def check_foreign_prepare(result, out: Path) -> None:
    samples = written(out)
    # 24 good samples (.cls i % 3); of the 3 bad: no image and a broken .json label are
    # skipped by the source, the undecodable png when its shard is built
    assert len(samples) == result.num_samples == 24
    assert Counter(s["cls"] for s in samples) == {0: 8, 1: 8, 2: 8}
    for sample in samples:
        assert sample["png"].size == (8, 8) and sample["png"].mode == "RGB"
    assert sorted(why.split(" (")[0] for _, why in result.skipped) == [
        "bad label: .json is not valid JSON",
        "missing image",
    ]
    assert [what for what, _ in result.unreadable] == ["tail-000000.tar:a.b/c/000901"]
    assert "undecodable .png" in result.unreadable[0][1]
    summary = result.summary()
    assert "1 unreadable files left out (1 undecodable .png)" in summary
    assert "2 skipped by the source" in summary and "1 missing image" in summary
    assert Manifest.from_json((out / "train" / MANIFEST_NAME).read_text()).class_names == [
        "0", "1", "2",
    ]  # fmt: skip


def test_webdataset_source_local(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    _dataset(shards)
    before = files(shards)
    out = tmp_path / "out"
    cfg = config(source=f"webdataset:{shards}", out=str(out), resolution=8, channels=3,
                 shard_size=5, val_fraction=0.25)  # fmt: skip
    result = prepare_dataset(cfg, log=None)
    check_foreign_prepare(result, out)
    assert files(shards) == before  # nothing written under the source
    first = files(out)
    again = prepare_dataset(cfg, log=None)  # a re-run: every shard in place, same bytes
    assert again.shards_written == 0 and files(out) == first
    other = tmp_path / "out2"  # deterministic: the same input gives the same bytes
    prepare_dataset(config(source=f"webdataset:{shards}", out=str(other), resolution=8,
                           channels=3, shard_size=5, val_fraction=0.25), log=None)  # fmt: skip
    shards_only = {k: v for k, v in first.items() if k.endswith(".tar")}
    assert {k: v for k, v in files(other).items() if k.endswith(".tar")} == shards_only
    listed = f"webdataset:{shards}/part-{{000000..000001}}.tar,{shards}/tail-000000.tar"
    result = prepare_dataset(config(source=listed, out=str(tmp_path / "out3"), resolution=8,
                                    channels=3), log=None)  # fmt: skip
    assert result.num_samples == 24  # a brace pattern + a list: the same samples


def test_webdataset_channels_come_from_the_images_when_unset(tmp_path: Path) -> None:
    """prepare.channels left unset: colour shards stay colour (3), grey ones grey (1)."""
    from pipeline.data.sources import WebDatasetSource

    shards = tmp_path / "shards"
    _dataset(shards)  # grey png and RGB jpg, mixed
    lines: list[str] = []
    out = tmp_path / "out"
    result = prepare_dataset(config(source=f"webdataset:{shards}", out=str(out),
                                    resolution=8, shard_size=5), log=lines.append)  # fmt: skip
    assert Manifest.from_json((out / "train" / MANIFEST_NAME).read_text()).channels == 3
    assert any(line.startswith("channels: 3, from the images of webdataset:") for line in lines)
    assert result.num_samples == 24
    grey = tmp_path / "grey"
    _write(grey, [{"__key__": f"k{i:02d}", "png": PNG_L, "cls": i % 2} for i in range(6)],
           maxcount=3)  # fmt: skip
    assert WebDatasetSource(str(grey), resolution=8, channels=None).channels == 1
    assert WebDatasetSource(str(grey), resolution=8, channels=3).channels == 3  # as set
    prepare_dataset(config(source=f"webdataset:{grey}", out=str(tmp_path / "g")), log=None)
    manifest = Manifest.from_json((tmp_path / "g" / "train" / MANIFEST_NAME).read_text())
    assert manifest.channels == 1


def test_webdataset_source_s3(tmp_path: Path, s3_bucket: str) -> None:
    local = tmp_path / "shards"
    _dataset(local)
    bucket = s3_bucket.removeprefix("s3://")
    for path in sorted(local.glob("*.tar")):
        boto3_client().upload_file(str(path), bucket, f"shards/{path.name}")
    before = s3_listing(s3_bucket)
    out = tmp_path / "out"
    cfg = config(source=f"webdataset:{s3_bucket}/shards", out=str(out), resolution=8,
                 channels=3, shard_size=5, val_fraction=0.25)  # fmt: skip
    result = prepare_dataset(cfg, log=None)
    check_foreign_prepare(result, out)
    assert s3_listing(s3_bucket) == before


def test_out_into_foreign_shards_is_refused(tmp_path: Path, capsys) -> None:
    shards = tmp_path / "shards"
    _write(shards, _samples(0, 6), maxcount=3)
    before = files(shards)
    cfg = config(source="synthetic:shapes", num_samples=10, out=str(shards))
    with pytest.raises(StorageInputError, match=r"fmpipe did not write .*choose another --out"):
        prepare_dataset(cfg, log=None)
    assert files(shards) == before
    code = prepare_job.main(["--source", f"webdataset:{shards}", "--out", str(shards)])
    err = capsys.readouterr().err
    assert code == 2 and str(shards) in err and "another --out" in err
    assert files(shards) == before
    # a split folder of shards without fmpipe's manifest is someone else's too
    other = tmp_path / "other"
    _write(other / "train", _samples(0, 3), maxcount=3, name="shard")
    with pytest.raises(StorageInputError, match="fmpipe did not write"):
        prepare_dataset(config(source="synthetic:shapes", num_samples=10, out=str(other)), log=None)
    # into the source's own folder (below it): refused as well
    with pytest.raises(StorageInputError, match="inside the source's shards folder"):
        prepare_dataset(
            config(source=f"webdataset:{shards}", out=str(shards / "prepared")), log=None
        )
    assert files(shards) == before


def make_cls_folder(root: Path) -> None:
    for rel, colour in (("cat/a.png", 10), ("cat/b.png", 20), ("dog/c.png", 30),
                        ("dog/d.png", 40), ("dog/e.png", 50), ("f.png", 60)):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 6), (colour, 0, 0)).save(root / rel)
    (root / "dog" / "d.cls").write_text("cat\n")  # a name: d is a cat
    (root / "dog" / "e.cls").write_text("2")  # an integer: class 2 of [cat, dog, fox]
    (root / "f.cls").write_text("fox")  # beside the class folders, labelled by its .cls
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG not really")


def check_cls_folder(result, out: Path) -> None:
    samples = written(out)
    by_file = {s["json"]["file"]: s["json"]["label_name"] for s in samples}
    assert by_file == {"cat/a.png": "cat", "cat/b.png": "cat", "dog/c.png": "dog",
                       "dog/d.png": "cat", "dog/e.png": "fox", "f.png": "fox"}  # fmt: skip
    assert result.skipped == [("dog/notes.txt", "not an image (.txt file)")]
    assert [what for what, _ in result.unreadable] == ["cat/broken.png"]
    assert "1 skipped by the source (1 not an image)" in result.summary()


def test_folder_cls_side_files_and_non_images(tmp_path: Path) -> None:
    make_cls_folder(tmp_path / "images")
    out = tmp_path / "out"
    cfg = config(source=f"folder:{tmp_path / 'images'}", out=str(out), resolution=4,
                 channels=3, val_fraction=0.0)  # fmt: skip
    check_cls_folder(prepare_dataset(cfg, log=None), out)


def test_folder_on_s3(tmp_path: Path, s3_bucket: str) -> None:
    local = tmp_path / "images"
    make_cls_folder(local)
    bucket = s3_bucket.removeprefix("s3://")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        boto3_client().upload_file(str(path), bucket, f"pets/{path.relative_to(local)}")
    before = s3_listing(s3_bucket)
    out = tmp_path / "out"
    cfg = config(source=f"folder:{s3_bucket}/pets", out=str(out), resolution=4, channels=3,
                 val_fraction=0.0)  # fmt: skip
    result = prepare_dataset(cfg, log=None)
    check_cls_folder(result, out)
    assert result.source == f"folder:{s3_bucket}/pets"
    assert s3_listing(s3_bucket) == before


def test_dataset_name() -> None:
    assert dataset_name("s3://data/pets") == "pets"
    assert dataset_name("s3://data/pets/") == "pets"
    assert dataset_name("/home/me/.fmpipe/store/digits") == "digits"
    assert dataset_name("s3://b/laion/part-{000000..000099}.tar") == "laion"
    assert dataset_name("s3://b/x/a/1.tar,s3://b/x/b/2.tar") == "x"
    assert dataset_name("s3://b/my data!/") == "my-data"
    assert dataset_name("s3://bucket") == "bucket"
    assert dataset_name("") == ""


def test_registered_model_name_defaults_from_the_dataset(capsys) -> None:
    import yaml

    from jobs import train as train_job

    def names(*argv: str) -> tuple[str, str]:
        assert train_job.main([*argv, "--print-config"]) == 0
        train = build_config(yaml.safe_load(capsys.readouterr().out)).train
        return train.registered_model_name, train.run_name

    def printed(*argv: str) -> str:
        return names(*argv)[0]

    assert printed() == "digits"  # train.yaml names the demo's model
    assert printed("--data", "s3://data/pets", "train.registered_model_name=") == "pets"
    assert printed("train.registered_model_name=") == "digits"  # .../store/digits
    pattern = "s3://b/laion/part-{000000..000009}.tar"
    assert printed("--data", pattern, "train.registered_model_name=") == "laion"
    assert printed("train.registered_model_name=none") == ""  # register nothing
    # The run is named the same way (so another dataset does not meet digits' checkpoints),
    # unless the config names it.
    assert names() == ("digits", "digits")
    assert names("--data", pattern) == ("laion", "laion")
    assert names("--data", pattern, "--run-name", "mine") == ("laion", "mine")
