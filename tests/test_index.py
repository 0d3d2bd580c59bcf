"""The index of datasets fmpipe did not write (pipeline.data.index, fmpipe index).

Shards written by ``webdataset.ShardWriter`` (and an img2dataset-style layout), read from a
local folder and from a real SeaweedFS; one local Ray for the module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from foreign_data import JPG_RGB, PNG_L, _dataset, _samples, _write
from localray import local_ray

from jobs import index as index_job
from pipeline.config import build_config
from pipeline.data.address import AddressError, ShardEntry
from pipeline.data.index import (
    DatasetIndex,
    IndexLocationError,
    build_index,
    index_shard_bytes,
)
from pipeline.data.labels import LabelSpec
from pipeline.storage import boto3_client


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3_server):
    """Local Ray for this module (tests/localray.py), after the S3 env is set."""
    with local_ray(num_cpus=2):
        yield


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _cfg(uri: str, **data):
    return build_config({"data": {"uri": uri, **data}})


def _check_counts(index: DatasetIndex) -> None:
    assert len(index.shards) == 3
    assert index.num_samples == 24
    assert index.splits == {"train": {"shards": 3, "samples": 24}}
    assert index.class_names == ["0", "1", "2"] and index.class_to_id == {"0": 0, "1": 1, "2": 2}
    labels: dict[str, int] = {}
    for shard in index.shards:
        for name, n in shard.labels.items():
            labels[name] = labels.get(name, 0) + n
    assert labels == {"0": 8, "1": 8, "2": 8}
    assert index.bad_counts == {"bad label": 1, "no image": 1, "undecodable image": 1}
    tail = next(s for s in index.shards if "tail-" in s.uri)
    assert tail.num_samples == 7 and tail.num_ok == 4
    reasons = {b["key"]: b["reason"] for b in tail.bad}
    assert reasons["a.b/c/000900"].startswith("no image (sample has: cls, json)")
    assert reasons["a.b/c/000901"].startswith("undecodable image: .png")
    assert reasons["a.b/c/000902"] == "bad label: .json is not valid JSON"
    assert index.channels == 3  # grey png and RGB jpg: RGB
    assert index.resolution == {"width_min": 8, "width_max": 12, "height_min": 8, "height_max": 10}
    first = next(s for s in index.shards if s.uri.endswith("part-000000.tar"))
    assert first.image_exts == {"jpg": 5, "png": 5} and first.modes == {"L": 5, "RGB": 5}
    assert len(first.sha256) == 64 and first.num_samples == 10


def test_local_index_counts_labels_bad_members_and_is_incremental(tmp_path, home):
    data = tmp_path / "shards"
    _dataset(data)
    before = _tree(data)
    result = build_index(_cfg(str(data)))
    assert _tree(data) == before  # nothing written under the source
    assert result.read == 3 and result.reused == 0
    assert result.uri.startswith(str(home / "indexes")) and result.uri.endswith(".json")
    _check_counts(result.index)
    stored = DatasetIndex.from_json(Path(result.uri).read_text())
    assert stored.content_hash == result.index.content_hash and stored.complete

    again = build_index(_cfg(str(data)))
    assert (again.read, again.reused) == (0, 3)
    assert again.index.content_hash == result.index.content_hash

    _write(data, _samples(100, 6, folder="x.y/z"), maxcount=100, name="more")
    grown = build_index(_cfg(str(data)))
    assert (grown.read, grown.reused) == (1, 3)
    assert grown.index.num_samples == 30
    assert grown.index.content_hash != result.index.content_hash


def test_s3_index_patterns_lists_and_nothing_written_under_the_source(s3_bucket, tmp_path):
    local = tmp_path / "src"
    _dataset(local)
    client = boto3_client()
    bucket = s3_bucket.removeprefix("s3://")
    for path in sorted(local.iterdir()):
        client.upload_file(str(path), bucket, f"shards/{path.name}")

    def listing() -> list[tuple[str, str]]:
        objects = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return sorted((o["Key"], o["ETag"]) for o in objects)

    before = listing()
    result = build_index(_cfg(f"{s3_bucket}/shards"))
    assert listing() == before
    _check_counts(result.index)
    assert all(s.etag and s.mtime_ns == 0 for s in result.index.shards)

    pattern = f"{s3_bucket}/shards/part-{{000000..000001}}.tar"
    two = build_index(_cfg(pattern, index_uri=str(tmp_path / "idx" / "two.json")))
    assert len(two.index.shards) == 2 and two.index.num_samples == 20
    listed = build_index(
        _cfg([pattern, f"{s3_bucket}/shards/tail-000000.tar"], index_uri=f"{s3_bucket}/meta/i.json")
    )
    assert listed.index.num_samples == 24 and listed.uri == f"{s3_bucket}/meta/i.json"
    assert listed.index.content_hash == result.index.content_hash  # the same bytes
    assert [k for k, _ in listing() if not k.startswith("shards/")] == ["meta/i.json"]

    with pytest.raises(IndexLocationError, match="inside the dataset's own folder"):
        build_index(_cfg(f"{s3_bucket}/shards", index_uri=f"{s3_bucket}/shards/i.json"))
    with pytest.raises(AddressError, match=r"8 of 10 not found \(\S+part-000002\.tar"):
        build_index(_cfg(f"{s3_bucket}/shards/part-{{000000..000009}}.tar"))


def test_labels_by_name_json_field_and_val_address(tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    names = ["dog", "cat", "emu"]
    samples = [
        {"__key__": f"k/{i:04d}", "png": PNG_L, "json": {"meta": {"class": names[i % 3]}}}
        for i in range(9)
    ]
    _write(train, samples[:6], maxcount=3)
    _write(val, samples[6:], maxcount=3)
    cfg = _cfg(str(train), val_uri=str(val), label_source="json", label_field="meta.class")
    index = build_index(cfg).index
    assert index.class_names == ["cat", "dog", "emu"]
    assert index.class_to_id == {"cat": 0, "dog": 1, "emu": 2}
    assert index.splits == {
        "train": {"shards": 2, "samples": 6},
        "val": {"shards": 1, "samples": 3},
    }
    assert index.channels == 1

    with pytest.raises(AddressError, match="in both"):
        build_index(_cfg(str(train), val_uri=f"{train}/part-000000.tar"))

    cls_names = tmp_path / "named"
    _write(
        cls_names, [{"__key__": f"n{i}", "jpg": JPG_RGB, "cls": names[i % 2]} for i in range(4)], 10
    )
    named = build_index(_cfg(str(cls_names))).index
    assert named.class_names == ["cat", "dog"] and named.num_samples == 4


def test_img2dataset_layout_is_unlabelled_unless_txt_is_asked_for(tmp_path):
    data = tmp_path / "img2"
    samples = [
        {
            "__key__": f"{i:09d}",
            "jpg": JPG_RGB,
            "txt": f"a photo of thing {i % 2}",
            "json": {"url": f"http://x/{i}.jpg", "status": "success", "caption": "..."},
        }
        for i in range(5)
    ]
    _write(data, samples, maxcount=100, name="00000")
    index = build_index(_cfg(str(data))).index
    assert index.class_names == [] and index.num_samples == 5 and index.bad_counts == {}
    captions = build_index(
        _cfg(str(data), label_source="txt", index_uri=str(tmp_path / "i.json"))
    ).index
    assert captions.class_names == ["a photo of thing 0", "a photo of thing 1"]


def test_a_labelled_dataset_counts_samples_without_a_label_as_bad(tmp_path):
    data = tmp_path / "mixed"
    _write(data, [*_samples(0, 4), {"__key__": "a.b/c/000050", "png": PNG_L}], maxcount=10)
    index = build_index(_cfg(str(data))).index
    assert index.num_samples == 4 and index.bad_counts == {"bad label": 1}
    assert index.shards[0].unlabelled_keys == ["a.b/c/000050"]


def test_index_shard_bytes_on_a_truncated_tar(tmp_path):
    _write(tmp_path, _samples(0, 6), maxcount=10)
    data = (tmp_path / "part-000000.tar").read_bytes()
    cut = data[: len(data) // 2]
    shard = index_shard_bytes(cut, ShardEntry("x.tar", len(cut)), LabelSpec())
    assert shard.error and shard.bad_counts.get("corrupt tar") == 1
    assert shard.num_ok < 6


def test_fmpipe_index_end_to_end(tmp_path, capsys):
    data = tmp_path / "shards"
    _dataset(data)
    where = tmp_path / "out" / "index.json"
    assert index_job.main(["--data", str(data), "--index", str(where), "seed=3"]) == 0
    out = capsys.readouterr().out
    assert "shards: 3 read, 0 reused" in out and "samples: 24" in out
    assert "bad members: bad label 1, no image 1, undecodable image 1" in out
    assert "classes: 3 (0, 1, 2)" in out and f"index written to {where}" in out
    assert json.loads(where.read_text())["num_samples"] == 24

    assert index_job.main(["--data", str(data), "--index", str(where)]) == 0
    assert "shards: 0 read, 3 reused" in capsys.readouterr().out

    assert index_job.main(["--data", f"{data}/part-{{000000..000005}}.tar"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "4 of 6 not found" in err and "part-000002.tar" in err

    assert index_job.main(["--data", str(data), "--index", str(data / "i.json")]) == 2
    assert "inside the dataset's own folder" in capsys.readouterr().err
    assert not (data / "i.json").exists()
    assert sorted(os.listdir(data)) == ["part-000000.tar", "part-000001.tar", "tail-000000.tar"]


def test_unreadable_shards_fail_the_run_and_keep_the_rest(tmp_path, monkeypatch):
    from pipeline.data import index as index_module
    from pipeline.storage import StorageError

    data = tmp_path / "shards"
    _dataset(data)
    real = index_module.list_shards
    ghost = ShardEntry(str(data / "gone.tar"), 10, mtime_ns=1)  # listed, then deleted

    monkeypatch.setattr(index_module, "list_shards", lambda a, s=None: [*real(a, s), ghost])
    with pytest.raises(StorageError, match="1 of 4 shard"):
        build_index(_cfg(str(data)))
    monkeypatch.setattr(index_module, "list_shards", real)
    stored = next((Path(os.environ["FMPIPE_HOME"]) / "indexes").glob("*.json"))
    partial = DatasetIndex.from_json(stored.read_text())
    assert not partial.complete and partial.unread == [ghost.uri] and len(partial.shards) == 3
    again = build_index(_cfg(str(data)))
    assert (again.read, again.reused) == (0, 3) and again.index.complete
