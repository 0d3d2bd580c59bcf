"""Dataset addresses (pipeline.data.address) and labels (pipeline.data.labels): no Ray.

Listings run against a local folder and a real SeaweedFS (``s3_bucket``).
"""

from __future__ import annotations

import pytest

from pipeline.config import build_config
from pipeline.data.address import (
    AddressError,
    address_text,
    expand,
    expand_braces,
    list_shards,
    split_address,
)
from pipeline.data.decode import BadSample
from pipeline.data.index import assign_split, carve_splits
from pipeline.data.labels import LabelSpec, class_map, label_id, raw_label
from pipeline.data.stream import DatasetError
from pipeline.storage import boto3_client


# --------------------------------------------------------------------------- parsing
def test_brace_ranges_keep_their_padding_and_lists_multiply():
    assert expand_braces("s3://b/train-{000000..000002}.tar") == [
        "s3://b/train-000000.tar",
        "s3://b/train-000001.tar",
        "s3://b/train-000002.tar",
    ]
    assert expand_braces("x-{8..10}.tar") == ["x-8.tar", "x-9.tar", "x-10.tar"]
    assert expand_braces("{a,b}/p-{0..1}.tar") == [
        "a/p-0.tar",
        "a/p-1.tar",
        "b/p-0.tar",
        "b/p-1.tar",
    ]
    assert expand_braces("x{a,{b,c}}y") == ["xay", "xby", "xcy"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.parametrize("bad", ["x-{0..2.tar", "x-0..2}.tar", "x-{3..1}.tar", "x-{abc}.tar"])
def test_malformed_patterns_are_address_errors(bad):
    with pytest.raises(AddressError) as err:
        expand_braces(bad)
    assert isinstance(err.value, DatasetError)
    assert bad in str(err.value)


def test_lists_split_at_top_level_commas_only():
    text = "s3://b/{a,b}-{0..1}.tar, ./more ,"
    assert split_address(text) == ["s3://b/{a,b}-{0..1}.tar", "./more"]
    assert split_address(["s3://b/x.tar", "s3://b/y.tar,s3://b/z.tar"]) == [
        "s3://b/x.tar",
        "s3://b/y.tar",
        "s3://b/z.tar",
    ]
    assert expand(text)[:4] == [
        "s3://b/a-0.tar",
        "s3://b/a-1.tar",
        "s3://b/b-0.tar",
        "s3://b/b-1.tar",
    ]
    assert address_text([" a ", "b"]) == "a,b"
    with pytest.raises(AddressError, match="empty dataset address"):
        split_address(" , ")


def test_config_takes_an_address_as_a_yaml_list():
    cfg = build_config({"data": {"uri": ["s3://b/x-{0..1}.tar", "./y"], "val_uri": ["./v"]}})
    assert cfg.data.uri == "s3://b/x-{0..1}.tar,./y" and cfg.data.val_uri == "./v"
    assert cfg.data.label_source == "auto" and cfg.data.label_field == "label"
    assert cfg.data.val_fraction == 0.0 and cfg.data.index_uri == ""


# --------------------------------------------------------------------------- listing
def _tars(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(b"t" * (10 + i))


def test_local_folder_prefix_pattern_and_list(tmp_path):
    _tars(tmp_path / "shards", ["train-0.tar", "train-1.tar", "val-0.tar", "notes.txt"])
    root = tmp_path / "shards"
    folder = list_shards(str(root))
    assert [e.uri.rsplit("/", 1)[1] for e in folder] == ["train-0.tar", "train-1.tar", "val-0.tar"]
    assert [e.size for e in folder] == [10, 11, 12] and all(e.mtime_ns > 0 for e in folder)
    assert [e.uri for e in list_shards(f"{root}/train-")] == [e.uri for e in folder[:2]]
    pattern = list_shards(f"{root}/{{train,val}}-0.tar")
    assert [e.uri.rsplit("/", 1)[1] for e in pattern] == ["train-0.tar", "val-0.tar"]
    both = list_shards([f"{root}/val-0.tar", f"{root}/train-{{0..1}}.tar", str(root)])
    assert [e.uri.rsplit("/", 1)[1] for e in both] == ["val-0.tar", "train-0.tar", "train-1.tar"]


def test_missing_shards_and_empty_patterns_are_one_line_errors(tmp_path):
    _tars(tmp_path, ["s-0.tar", "s-1.tar"])
    with pytest.raises(AddressError) as err:
        list_shards(f"{tmp_path}/s-{{0..2}}.tar")
    message = str(err.value)
    assert "\n" not in message and f"{tmp_path}/s-{{0..2}}.tar" in message
    assert "missing" in message and "s-2.tar" in message
    with pytest.raises(AddressError, match="matches no shard"):
        list_shards(f"{tmp_path}/q-{{0..2}}.tar")
    with pytest.raises(AddressError, match=r"no \.tar shards"):
        list_shards(str(tmp_path / "nowhere"))


def _counting_client(monkeypatch):
    calls: list[str] = []
    client = boto3_client()
    client.meta.events.register("before-call.s3", lambda model, **kw: calls.append(model.name))
    monkeypatch.setattr("pipeline.data.address.boto3_client", lambda storage=None: client)
    return calls


def test_s3_listing_one_call_per_prefix_with_etags(s3_bucket, monkeypatch):
    client = boto3_client()
    bucket = s3_bucket.removeprefix("s3://")
    for i in range(5):
        client.put_object(Bucket=bucket, Key=f"shards/train-{i:03d}.tar", Body=b"x" * (i + 1))
    client.put_object(Bucket=bucket, Key="shards/sub/deeper.tar", Body=b"y")
    client.put_object(Bucket=bucket, Key="shards/readme.md", Body=b"z")
    calls = _counting_client(monkeypatch)

    folder = list_shards(f"{s3_bucket}/shards")
    assert [e.uri for e in folder] == [f"{s3_bucket}/shards/train-{i:03d}.tar" for i in range(5)]
    assert [e.size for e in folder] == [1, 2, 3, 4, 5]
    head = client.head_object(Bucket=bucket, Key="shards/train-002.tar")
    assert folder[2].etag == head["ETag"].strip('"') and folder[2].version == folder[2].etag
    assert calls == ["ListObjectsV2"]

    calls.clear()
    pattern = list_shards(f"{s3_bucket}/shards/train-{{000..003}}.tar")
    assert len(pattern) == 4 and calls == ["ListObjectsV2"]  # not one HEAD per shard
    with pytest.raises(AddressError, match=r"train-007\.tar"):
        list_shards(f"{s3_bucket}/shards/train-{{000..007}}.tar")
    assert len(list_shards(f"{s3_bucket}/shards/train-00")) == 5


# --------------------------------------------------------------------------- labels
def test_labels_from_cls_json_and_txt():
    auto = LabelSpec()
    assert raw_label({"cls": b" 03\n", "json": b'{"label": 9}'}, auto) == "3"
    assert raw_label({"cls": b"cat"}, auto) == "cat"
    assert raw_label({"json": b'{"label": "dog"}'}, auto) == "dog"
    assert raw_label({"json": b'{"meta": {"class": 4}}'}, LabelSpec("json", "meta.class")) == "4"
    assert raw_label({"json": b'{"meta": {}}'}, LabelSpec("json", "meta.class")) is None
    # img2dataset: a caption in .txt and download metadata in .json are not classes
    img2 = {"jpg": b"..", "txt": b"a photo of a cat", "json": b'{"status": "success"}'}
    assert raw_label(img2, auto) is None
    assert raw_label(img2, LabelSpec("txt")) == "a photo of a cat"
    assert raw_label({"cls": b"1"}, LabelSpec("none")) is None
    assert raw_label({"json": b'{"label": 2}'}, LabelSpec("cls")) is None


@pytest.mark.parametrize(
    ("members", "spec", "why"),
    [
        ({"cls": b"\xff\xfe"}, LabelSpec(), "not UTF-8"),
        ({"cls": b"  "}, LabelSpec(), "empty"),
        ({"json": b"{nope"}, LabelSpec("json"), "not valid JSON"),
        ({"json": b'{"label": [1, 2]}'}, LabelSpec("json"), "list"),
        ({"json": b'{"label": true}'}, LabelSpec("json"), "bool"),
    ],
)
def test_unreadable_labels_are_bad_samples(members, spec, why):
    with pytest.raises(BadSample) as err:
        raw_label(members, spec)
    assert err.value.reason.startswith("bad label") and why in err.value.reason


def test_class_map_and_label_id():
    names, ids = class_map(["3", "0", "3", "1"])
    assert names == ["0", "1", "2", "3"] and ids["3"] == 3
    names, ids = class_map(["dog", "cat", "dog"])
    assert names == ["cat", "dog"] and ids == {"cat": 0, "dog": 1}
    assert class_map([]) == ([], {})
    spec = LabelSpec()
    assert label_id({"cls": b"dog"}, spec, ids) == 1
    assert label_id({"cls": b"dog"}, spec, {}) == -1  # unlabelled dataset
    with pytest.raises(BadSample, match="bad label: missing"):
        label_id({"png": b""}, spec, ids)
    with pytest.raises(BadSample, match="not one of the dataset's 2 classes"):
        label_id({"cls": b"emu"}, spec, ids)


# --------------------------------------------------------------------------- val split
def test_val_carve_out_is_per_shard_and_stable_when_shards_are_added():
    uris = [f"s3://b/train-{i:05d}.tar" for i in range(2000)]
    first = {u: assign_split(u, 7, 0.1) for u in uris[:1000]}
    later = {u: assign_split(u, 7, 0.1) for u in uris}
    assert all(later[u] == first[u] for u in first)
    share = sum(s == "val" for s in later.values()) / len(later)
    assert 0.07 < share < 0.13
    assert {assign_split(u, 7, 0.0) for u in uris} == {"train"}
    assert {u for u in uris if assign_split(u, 8, 0.1) == "val"} != {
        u for u in uris if later[u] == "val"
    }


def test_val_carve_out_of_few_shards_never_leaves_a_split_empty():
    """10 shards at 0.3 draw no val shard for ~3% of seeds, 2 shards at 0.9 both val for
    ~81%: a stand-in fills the empty split; where the draws fill both, nothing changes."""
    ten = [f"/data/many/{i:06d}.tar" for i in range(10)]
    two = ten[:2]
    stand_ins = 0
    for seed in range(200):
        splits = carve_splits(ten, seed, 0.3)
        drawn = {u: assign_split(u, seed, 0.3) for u in ten}
        assert "val" in splits.values() and "train" in splits.values()
        assert sum(splits[u] != drawn[u] for u in ten) <= 1
        stand_ins += splits != drawn
        assert sorted(carve_splits(two, seed, 0.9).values()) == ["train", "val"]
    assert 0 < stand_ins < 20  # the draws decide almost always
    assert carve_splits(ten, 3, 0.0) == dict.fromkeys(ten, "train")
    assert carve_splits(ten[:1], 3, 0.5) == {ten[0]: assign_split(ten[0], 3, 0.5)}
