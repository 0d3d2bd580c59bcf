"""The training stream: shards -> decoded, paired batches; bad input counted and reported.

Streams come from the one builder training uses (:func:`build_train_stream`) and are read
through the training loop's consumer (:meth:`RayDataSource.iter_batches`), here in the
test process; ``keys=True`` keeps each sample's key so rows can be checked one by one.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from pipeline.config import Config, build_config
from pipeline.data.coupling import PairingStage
from pipeline.data.decode import BadSample, DecodeSpec, decode_image, to_model_range
from pipeline.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, shard_name
from pipeline.data.stream import (
    DatasetError,
    ShardStats,
    TooManyBadSamples,
    TrainStreamStage,
    _plain_tar_members,
    bad_sample_tracker,
    build_train_stream,
    collate_batch,
    decode_spec,
    open_dataset,
    read_shard,
    shard_order,
)
from pipeline.storage import resolve
from pipeline.train.data import RayDataSource

RES = 8
ATOL = 1 / 127.5 + 1e-6  # one 8-bit step in [-1, 1]

Sample = tuple[str, dict[str, bytes]]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3_server):
    # SeaweedFS first: Ray workers take the S3 endpoint and credentials from the
    # environment they start with (no secret travels inside a pickled filesystem).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _encode(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def _tar(samples: Iterable[Sample]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in sorted(samples):
            for ext, data in sorted(members.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _webdataset_tar(tmp: Path, samples: list[Sample]) -> bytes:
    import webdataset as wds

    pattern = str(tmp / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=10_000, verbose=0) as sink:
        for key, members in sorted(samples):
            sink.write({"__key__": key, **members})
    return (tmp / "wds-000000.tar").read_bytes()


def _write_split(
    uri: str,
    shards: list[bytes],
    counts: list[int],
    *,
    class_names: list[str] | None = None,
    split: str = "train",
) -> None:
    where = resolve(uri).child(split)
    infos = []
    for index, (data, count) in enumerate(zip(shards, counts, strict=True)):
        where.child(shard_name(index)).write_bytes(data)
        infos.append(ShardInfo(shard_name(index), count, hashlib.sha256(data).hexdigest()))
    manifest = Manifest(
        split=split,
        resolution=RES,
        channels=1,
        image_format="png",
        class_names=class_names if class_names is not None else [str(i) for i in range(10)],
        shards=infos,
    )
    where.child(MANIFEST_NAME).write_bytes(manifest.to_json().encode())


def _digits(num_shards: int, per_shard: int, seed: int = 0):
    """L-mode RES x RES PNG samples with labels: (shard bytes, {key: (u8 image, label)})."""
    rng = np.random.default_rng(seed)
    shards, truth = [], {}
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            key = f"{s * per_shard + i:08d}"
            image = rng.integers(0, 256, size=(RES, RES), dtype=np.uint8)
            label = int(rng.integers(0, 10))
            truth[key] = (image, label)
            samples.append((key, {"png": _encode(image), "cls": str(label).encode()}))
        shards.append(_tar(samples))
    return shards, truth


def _cfg(uri: str, *overrides: str) -> Config:
    return build_config(
        overrides=[f"data.uri={uri}", f"data.resolution={RES}", "data.batch_size=16", *overrides]
    )


def _keyed_stream(cfg: Config, epoch: int = 0, num_epochs: int = 1, **kw) -> ray.data.Dataset:
    """The training stream of ``num_epochs`` epochs from ``epoch``, with its keys."""
    return build_train_stream(cfg, open_dataset(cfg, "train"), epoch, num_epochs, keys=True, **kw)


def _batches(cfg: Config, epoch: int = 0, split: str = "train") -> Iterator[dict]:
    """One epoch's train-ready batches of ``data.batch_size`` rows (the last one short)
    through the training consumer, keys kept. The dataset is opened now: a missing or
    empty one raises here, before any Ray work."""
    info = open_dataset(cfg, split)
    stream = build_train_stream(cfg, info, epoch, 1, keys=True)
    tracker = bad_sample_tracker(cfg, info, epoch)
    source = RayDataSource.from_config(cfg, keys=True, tracker=tracker)
    return source.iter_batches(stream, cfg.data.batch_size, drop_last=False)


def _collect(cfg: Config, epoch: int = 0, split: str = "train") -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for batch in _batches(cfg, epoch, split):
        for i, key in enumerate(batch["key"]):
            assert key not in rows, f"{key} arrived twice"
            rows[key] = {name: batch[name][i] for name in ("x_1", "x_0", "t", "label")}
    return rows


def _check_round_trip(rows: dict[str, dict], truth: dict) -> None:
    assert sorted(rows) == sorted(truth)  # every sample exactly once
    for key, (image, label) in truth.items():
        row = rows[key]
        assert row["x_1"].dtype == torch.float32 and row["x_1"].shape == (1, RES, RES)
        expected = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0)[None]
        torch.testing.assert_close(row["x_1"], expected, atol=ATOL, rtol=0)
        assert int(row["label"]) == label
        assert row["x_0"].shape == (1, RES, RES) and 0.0 <= float(row["t"]) <= 1.0


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """A labelled local dataset: 3 shards x 12 samples."""
    root = tmp_path_factory.mktemp("digits")
    shards, truth = _digits(3, 12)
    _write_split(str(root), shards, [12] * 3)
    return str(root), truth


# --------------------------------------------------------------------------- decode (no Ray)
def test_decode_exact_for_stored_size_and_mode():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = decode_image(_encode(image), "png", DecodeSpec(8, 1))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 1)
    np.testing.assert_array_equal(out[:, :, 0], image)
    chw = to_model_range(out[None])
    assert chw.shape == (1, 1, 8, 8) and chw.dtype == np.float32
    assert chw.min() >= -1.0 and chw.max() <= 1.0
    flipped = decode_image(_encode(image), "png", DecodeSpec(8, 1), flip=True)
    np.testing.assert_array_equal(flipped[:, :, 0], image[:, ::-1])


def test_decode_formats_modes_and_sizes():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    spec3, spec1 = DecodeSpec(8, 3), DecodeSpec(8, 1)
    for data, ext in [
        (_encode(rgb, "JPEG", quality=95), "jpeg"),
        (_encode(rgb, "JPEG"), "jpg"),
        (_encode(rgb, "WEBP", lossless=True), "webp"),
        (_encode(rgb), "png"),
    ]:
        assert decode_image(data, ext, spec3).shape == (8, 8, 3)
        assert decode_image(data, ext, spec1).shape == (8, 8, 1)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white, fully transparent -> black
    assert decode_image(_encode(rgba), "png", spec1).max() == 0
    grey = np.full((8, 8), 200, dtype=np.uint8)
    assert (decode_image(_encode(grey), "png", spec3) == 200).all()  # L -> RGB
    # lossless webp at the stored size is exact
    exact = decode_image(_encode(rgb[:8, :8], "WEBP", lossless=True), "webp", spec3)
    np.testing.assert_array_equal(exact, rgb[:8, :8])
    # a non-square image keeps its centre: left/right thirds black, centre white
    wide = np.zeros((8, 24), dtype=np.uint8)
    wide[:, 8:16] = 255
    assert (decode_image(_encode(wide), "png", spec1) == 255).all()


@pytest.mark.parametrize(
    ("data", "ext", "reason"),
    [
        (b"not an image at all", "png", "undecodable"),
        (_encode(np.zeros((8, 8), np.uint8))[:40], "png", "undecodable"),
        (b"\x80\x04K\x01.", "pkl", "unsupported image type"),
        # a format Pillow reads but the extension table does not name
        (_encode(np.zeros((8, 8), np.uint8), "TGA"), "png", "undecodable"),
        (_encode(np.zeros((9, 9), np.uint8), "PNG"), "png", "decompression bomb: 9x9 = 81"),
    ],
)
def test_decode_bad_input_raises_bad_sample(data, ext, reason):
    with pytest.raises(BadSample, match=reason):
        decode_image(data, ext, DecodeSpec(8, 1, max_pixels=80))


@pytest.mark.parametrize(
    ("array", "fmt", "value"),
    [
        (np.full((8, 8), 100 * 257, np.uint16), "PNG", 100),  # 16-bit: round(v / 257)
        (np.full((1, 1), 77, np.uint8), "PNG", 77),  # a 1x1 image
        (np.full((8, 64), 77, np.uint8), "PNG", 77),  # aspect ratio 8
        (np.full((8, 8), 77, np.uint8), "GIF", 77),  # a GIF, even stored as .png
    ],
)
def test_decode_uses_what_was_refused_before(array, fmt, value):
    """Issue 14: 16-bit modes, GIFs, tiny sides and extreme aspect ratios are used, not
    skipped as bad samples (these cases used to raise BadSample)."""
    out = decode_image(_encode(array, fmt), "png", DecodeSpec(8, 1))
    assert out.shape == (8, 8, 1)
    assert (np.abs(out.astype(int) - value) <= 1).all()


def test_read_shard_truncated_and_missing_image():
    shards, _ = _digits(1, 6)
    members = [(f"{i:08d}", {"png": _encode(np.zeros((8, 8), np.uint8))}) for i in range(6)]
    members[2] = (members[2][0], {"cls": b"3", "json": b"{}"})  # no image
    good, stats = read_shard(_tar(members), "s.tar", 6, DecodeSpec(8, 1))
    assert stats.ok == 5 and stats.bad == 1 and stats.lost == 0
    assert [(r.key, r.reason) for r in stats.examples] == [
        ("00000002", "missing image (sample has: cls, json)")
    ]
    cut = shards[0][: len(shards[0]) // 2 + 100]
    good, stats = read_shard(cut, "t.tar", 6, DecodeSpec(8, 1), num_classes=10)
    assert 0 < stats.ok < 6 and stats.ok == len(good)
    assert stats.ok + stats.bad + stats.lost == 6 and stats.lost > 0
    assert "truncated or corrupt tar" in stats.error
    good, stats = read_shard(b"\x00garbage" * 100, "g.tar", 4, DecodeSpec(8, 1))
    assert stats.ok == 0 and stats.lost == 4 and stats.error


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_tar_walk_matches_tarfile_or_defers_to_it(fmt):
    """The header parser reads what tarfile reads, and hands tarfile what it cannot read."""
    rng = np.random.default_rng(0)

    def archive(names: list[str], with_dir: bool = False) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            if with_dir:
                info = tarfile.TarInfo("sub")
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            for name in names:
                payload = rng.bytes(int(rng.integers(0, 1500)))
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        return buf.getvalue()

    plain = archive([f"sub/{i:06d}.{ext}" for i in range(5) for ext in ("png", "cls")], True)
    assert _plain_tar_members(plain) == _tarfile_members(plain)
    prefixed = archive([f"{'d' * 120}/{i:04d}.png" for i in range(3)])  # ustar prefix field
    fast = _plain_tar_members(prefixed)
    assert fast is None or fast == _tarfile_members(prefixed)
    if fmt == tarfile.USTAR_FORMAT:
        assert fast is not None  # the prefix field is parsed, not deferred
    if fmt != tarfile.USTAR_FORMAT:  # a name ustar cannot hold: pax or GNU long-name header
        long_name = archive(["x" * 150 + ".png"])
        if fmt == tarfile.GNU_FORMAT:  # a GNU long-name header: tarfile's job
            assert _plain_tar_members(long_name) is None
        else:  # a pax "path" record: read by the fast walk too, exactly as tarfile reads it
            assert _plain_tar_members(long_name) == _tarfile_members(long_name)
        assert _tarfile_members(long_name)[0][0] == "x" * 150 + ".png"
    # damage: a flipped header byte, a cut member, a missing end marker -> tarfile decides
    broken = bytearray(plain)
    broken[5] ^= 0xFF
    assert _plain_tar_members(bytes(broken)) is None
    # a later header whose fields all still parse: only its checksum shows the damage
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        last_header = tar.getmembers()[-1].offset
    broken = bytearray(plain)
    broken[last_header + 140] ^= 0x01  # an mtime digit: '0'..'7' stays octal
    assert _plain_tar_members(bytes(broken)) is None
    assert _plain_tar_members(plain[: len(plain) // 2]) is None
    assert _plain_tar_members(plain.rstrip(b"\0")) is None


def test_fmpipe_written_shards_take_the_fast_tar_walk(tmp_path):
    from pipeline.data.prepare import prepare_dataset
    from pipeline.sample.shards import tar_bytes

    out = str(tmp_path / "digits")
    cfg = build_config(
        {"prepare": {"source": "digits", "out": out, "shard_size": 500}, "data": {"uri": out}}
    )
    prepare_dataset(cfg, log=None)
    info = open_dataset(cfg, "train")
    written = [info.location.child(s.name).read_bytes() for s in info.manifest.shards]
    written.append(tar_bytes([(f"{i:010d}.png", bytes(range(i))) for i in range(40)]))
    for data in written:
        fast = _plain_tar_members(data)
        assert fast is not None and fast == _tarfile_members(data)


def test_shardwriter_shards_take_the_fast_tar_walk_and_odd_pax_headers_do_not(tmp_path):
    """webdataset's ShardWriter writes a pax header (mtime) before every member: the fast
    walk reads past it (the same members as tarfile); a pax header that changes a member
    (its size) or a long path it names still goes to tarfile, or is honoured alike."""
    import tarfile

    import webdataset as wds

    path = tmp_path / "w-%06d.tar"
    with wds.ShardWriter(str(path), maxcount=100, verbose=0) as sink:
        for i in range(12):
            sink.write({"__key__": f"a.b/c/{i:06d}", "png": bytes(range(i + 1)), "cls": i % 3})
    data = (tmp_path / "w-000000.tar").read_bytes()
    assert b"mtime=" in data  # the pax records this test is about
    fast = _plain_tar_members(data)
    assert fast is not None and fast == _tarfile_members(data) and len(fast) == 24

    def pax_tar(pax: dict[str, str]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("k/" + "x" * 120 + ".png")  # a path over 100 bytes
            info.size, info.pax_headers = 3, pax
            tar.addfile(info, io.BytesIO(b"abc"))
        return buf.getvalue()

    long_path = pax_tar({"comment": "hi"})
    assert _plain_tar_members(long_path) == _tarfile_members(long_path)  # pax "path" honoured
    assert _plain_tar_members(pax_tar({"size": "3"})) is None  # a key it cannot honour


def test_read_shard_flip_is_seeded_per_key():
    rng = np.random.default_rng(4)
    images = {f"{i:08d}": rng.integers(0, 256, (RES, RES), dtype=np.uint8) for i in range(40)}
    data = _tar((k, {"png": _encode(v)}) for k, v in images.items())

    def flipped(seed: int) -> list[str]:
        out, stats = read_shard(data, "s", 40, DecodeSpec(RES, 1), seed=seed, hflip=True)
        assert stats.ok == 40
        for key, _, image in out:
            assert np.array_equal(image[:, :, 0], images[key]) or np.array_equal(
                image[:, :, 0], images[key][:, ::-1]
            )
        return [k for k, _, image in out if not np.array_equal(image[:, :, 0], images[k])]

    assert flipped(0) == flipped(0)
    assert flipped(0) != flipped(1)
    assert 5 < len(flipped(0)) < 35
    plain, _ = read_shard(data, "s", 40, DecodeSpec(RES, 1), seed=0)
    assert all(np.array_equal(image[:, :, 0], images[k]) for k, _, image in plain)


def test_read_shard_random_crop_is_seeded_per_key():
    # 8 x 24 pictures whose columns hold their index: the crop's offset is readable
    columns = np.tile((np.arange(3 * RES) * 10).astype(np.uint8), (RES, 1))
    keys = [f"{i:08d}" for i in range(40)]
    data = _tar((k, {"png": _encode(columns)}) for k in keys)
    spec = DecodeSpec(RES, 1, resize="random_crop")

    def offsets(seed: int, epoch: int = 0) -> dict[str, float]:
        out, stats = read_shard(data, "s", 40, spec, seed=seed, epoch=epoch)
        assert stats.ok == 40
        # the first column of the crop is the offset * 10 (bicubic between whole columns)
        return {key: image[0, 0, 0] / 10.0 for key, _, image in out}

    first = offsets(0)
    assert first == offsets(0)  # reproducible
    assert first != offsets(1) and first != offsets(0, epoch=1)
    assert len({round(v) for v in first.values()}) > 5  # spread along 0..16
    assert all(0 <= v <= 2 * RES for v in first.values())
    centred, _ = read_shard(data, "s", 40, DecodeSpec(RES, 1), seed=0)
    assert all(image[0, 0, 0] == 80 for _, _, image in centred)  # offset 8: column 8
    # the stream's draw is decode_image's crop_at from sample_seed(..., stream="crop")
    from pipeline.data.coupling import sample_seed

    got = dict((k, image) for k, _, image in read_shard(data, "s", 40, spec, seed=3)[0])
    for key in keys[:5]:
        crop_at = (sample_seed(3, 0, key, stream="crop") >> 10) / 2.0**53
        expected = decode_image(_encode(columns), "png", spec, crop_at=crop_at)
        np.testing.assert_array_equal(got[key], expected)


# --------------------------------------------------------------------------- round trips
def test_round_trip_local(digits_root):
    uri, truth = digits_root
    rows = _collect(_cfg(uri))
    _check_round_trip(rows, truth)
    assert all(row["x_0"].dtype == torch.float32 for row in rows.values())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_collate_gives_float32_noise_of_any_storage_dtype(dtype):
    from pipeline.data.coupling import _store_noise, noise_to_float

    x_0 = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    stored = _store_noise(x_0, dtype)
    stored.flags.writeable = False  # as Ray hands it out: a view of the object store
    batch = collate_batch({"x_0": stored, "key": np.array(list("abcdef"), dtype=object)})
    assert batch["x_0"].dtype == torch.float32 and batch["key"] == list("abcdef")
    expected = noise_to_float(torch.from_numpy(stored.copy()))
    torch.testing.assert_close(batch["x_0"], expected, rtol=0, atol=0)
    rounded = x_0 if dtype == "float32" else x_0.to(getattr(torch, dtype)).float()
    torch.testing.assert_close(batch["x_0"], rounded, rtol=0, atol=0)  # the stored values
    # float32 is handed over zero-copy (as Ray's own collate); 16-bit noise is converted
    assert np.shares_memory(batch["x_0"].numpy(), stored) == (dtype == "float32")
    if dtype == "float32":
        torch.testing.assert_close(batch["x_0"], x_0, rtol=0, atol=0)


def test_round_trip_s3(s3_bucket):
    shards, truth = _digits(2, 10, seed=1)
    uri = f"{s3_bucket}/ds"
    _write_split(uri, shards, [10, 10])
    info = open_dataset(_cfg(uri), "train")
    assert info.location.is_s3 and info.num_samples == 20
    _check_round_trip(_collect(_cfg(uri, "data.noise_dtype=float16")), truth)


def test_tarfile_and_webdataset_shards_with_mixed_formats(tmp_path):
    rng = np.random.default_rng(3)
    samples: list[Sample] = []
    kinds = [
        ("jpeg", "JPEG", (10, 14, 3), "RGB"),
        ("webp", "WEBP", (8, 8), "L"),
        ("png", "PNG", (16, 8, 4), "RGBA"),
        ("jpg", "JPEG", (8, 8), "L"),
        ("png", "PNG", (9, 9), "P"),
    ]
    for i in range(10):
        ext, fmt, shape, mode = kinds[i % len(kinds)]
        array = rng.integers(0, 256, size=shape, dtype=np.uint8)
        image = Image.fromarray(array).convert(mode) if mode == "P" else Image.fromarray(array)
        buf = io.BytesIO()
        image.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        samples.append((f"{i:08d}", {ext: buf.getvalue(), "cls": str(i % 10).encode()}))
    shards = [_tar(samples[:5]), _webdataset_tar(tmp_path, samples[5:])]
    uri = str(tmp_path / "mixed")
    _write_split(uri, shards, [5, 5])
    for channels in (1, 3):
        rows = _collect(_cfg(uri, f"data.channels={channels}", "data.max_bad_fraction=0"))
        assert sorted(rows) == [key for key, _ in samples]
        for key, row in rows.items():
            assert row["x_1"].shape == (channels, RES, RES)
            assert -1.0 <= float(row["x_1"].min()) <= float(row["x_1"].max()) <= 1.0
            assert int(row["label"]) == int(key) % 10
    # the lossless webp of key 1 is stored at the target size: exact (RGB, as WEBP stores it)
    webp = np.asarray(Image.open(io.BytesIO(samples[1][1]["webp"])), dtype=np.float32)
    expected = torch.from_numpy(webp / 127.5 - 1.0).permute(2, 0, 1)
    torch.testing.assert_close(rows["00000001"]["x_1"], expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- order + pairing
def test_shard_order_per_epoch(digits_root):
    uri, truth = digits_root
    names = [shard_name(i) for i in range(20)]
    assert shard_order(names, 0, 1) == shard_order(names, 0, 1)
    assert shard_order(names, 0, 1) != shard_order(names, 0, 2)
    assert shard_order(names, 0, 1) != shard_order(names, 1, 1)
    assert sorted(shard_order(names, 0, 1)) == names
    assert shard_order(names, 0, 1, shuffle=False) == names

    cfg = _cfg(uri)
    info = open_dataset(cfg, "train")
    shard_of = {key: int(key) // 12 for key in truth}

    def streamed_order(epoch: int) -> list[str]:
        ds = build_train_stream(cfg, info, epoch, 1, keys=True, preserve_order=True)
        return [str(k) for k in ds.select_columns(["key"]).to_pandas()["key"]]

    for epoch in (0, 1):
        keys = streamed_order(epoch)
        shards = list(dict.fromkeys(shard_name(shard_of[k]) for k in keys))
        assert shards == shard_order([s.name for s in info.shards], cfg.seed, epoch)
        assert keys == streamed_order(epoch)  # same seed, same order
    assert streamed_order(0) != streamed_order(1)


def test_multi_epoch_stream_is_the_one_epoch_streams_back_to_back(digits_root):
    uri, truth = digits_root
    cfg = _cfg(uri, "seed=3", "data.hflip=true")
    info = open_dataset(cfg, "train")
    ds = build_train_stream(cfg, info, 1, 2, keys=True, preserve_order=True)
    rows = ds.to_pandas()
    assert rows["epoch"].tolist() == sorted(rows["epoch"].tolist())  # epoch 1, then 2
    for epoch in (1, 2):
        part = rows[rows["epoch"] == epoch]
        alone = build_train_stream(cfg, info, epoch, 1, keys=True, preserve_order=True)
        alone = alone.to_pandas()
        assert (alone["epoch"] == epoch).all()  # a one-epoch stream starting at `epoch`
        assert part["key"].tolist() == alone["key"].tolist()  # same shard and sample order
        assert sorted(part["key"]) == sorted(truth)  # every sample once per epoch
        for name in ("x_1", "x_0", "t", "label"):  # same flips, noise and times
            np.testing.assert_array_equal(np.stack(part[name]), np.stack(alone[name]))
    first, second = (rows[rows["epoch"] == e].set_index("key") for e in (1, 2))
    assert not np.array_equal(np.stack(first["x_0"]), np.stack(second.loc[first.index, "x_0"]))
    with pytest.raises(ValueError, match="num_epochs"):
        build_train_stream(cfg, info, 0, 0)


def test_pairing_reproducible_through_the_stream(digits_root):
    uri, _ = digits_root
    a = _collect(_cfg(uri, "seed=5"))
    b = _collect(_cfg(uri, "seed=5"))
    c = _collect(_cfg(uri, "seed=6"))
    for key in a:
        torch.testing.assert_close(a[key]["x_0"], b[key]["x_0"], rtol=0, atol=0)
        torch.testing.assert_close(a[key]["t"], b[key]["t"], rtol=0, atol=0)
        torch.testing.assert_close(a[key]["x_1"], c[key]["x_1"], rtol=0, atol=0)
        assert not torch.equal(a[key]["x_0"], c[key]["x_0"])


def test_worker_splits_share_the_stream_and_bfloat16_noise(digits_root):
    """Two workers' splits of the one stream, as Ray Train makes them (``streaming_split``,
    equal): disjoint, every sample once in all, and bfloat16 noise arrives as float32."""
    uri, truth = digits_root
    full = _collect(_cfg(uri))
    cfg = _cfg(uri, "data.noise_dtype=bfloat16")
    splits = _keyed_stream(cfg).streaming_split(2, equal=True)
    source = RayDataSource.from_config(cfg, keys=True)

    def read(split) -> list[dict]:
        return list(source.iter_batches(split, 6, drop_last=False))

    with ThreadPoolExecutor(2) as pool:  # the splits are read together, as workers do
        parts = list(pool.map(read, splits))
    seen: list[str] = []
    for batches in parts:
        assert sum(len(batch["key"]) for batch in batches) == len(truth) // 2
        for batch in batches:
            assert batch["x_0"].dtype == torch.float32
            for key, x_0 in zip(batch["key"], batch["x_0"], strict=True):
                torch.testing.assert_close(x_0, full[key]["x_0"], rtol=2**-8, atol=1e-3)
            seen += batch["key"]
    assert sorted(seen) == sorted(truth)


def test_training_path_batches_equal_the_keyed_ones(digits_root):
    """The stream as training reads it (no keys, Ray's default collate, drop_last) gives
    the rows of the keyed stream, in full micro-batches with their epoch."""
    uri, _ = digits_root
    cfg = _cfg(uri, "seed=2", "data.hflip=true")
    info = open_dataset(cfg, "train")
    plain = build_train_stream(cfg, info, 3, 2, preserve_order=True)
    keyed = build_train_stream(cfg, info, 3, 2, keys=True, preserve_order=True)
    assert "key" not in plain.columns() and "key" in keyed.columns()
    got = list(RayDataSource.from_config(cfg).iter_batches(plain, 16))
    want = list(RayDataSource.from_config(cfg, keys=True).iter_batches(keyed, 16))
    assert [len(b["t"]) for b in got] == [16] * (72 // 16)  # the short tail is dropped
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert set(a) == {"x_1", "x_0", "t", "label", "epoch"} and "key" in b
        assert a["x_0"].dtype == torch.float32 and a["epoch"].dtype == torch.int64
        for name in ("x_1", "x_0", "t", "label", "epoch"):
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    epochs = torch.cat([b["epoch"] for b in got]).tolist()
    assert epochs == sorted(epochs) and set(epochs) == {3, 4}


def test_stream_rows_need_their_epoch(digits_root):
    uri, _ = digits_root
    cfg = _cfg(uri)
    stage = TrainStreamStage(cfg, open_dataset(cfg, "train"), tracker=None)
    row = {"name": np.array(["s"]), "path": np.array(["p"]), "num_samples": np.array([1])}
    with pytest.raises(ValueError, match="'epoch' column"):
        next(stage(row))
    assert decode_spec(cfg) == DecodeSpec(RES, 1)
    cfg = build_config({"data": {"resize": "pad", "alpha_background": "white", "max_pixels": 1000}})
    assert decode_spec(cfg) == DecodeSpec(16, 1, resize="pad", background="white", max_pixels=1000)


def test_bench_data_times_the_training_path(digits_root):
    """`fmpipe bench data` (c) reads the training stream through the 1-worker split and the
    loop's consumer: whole micro-batches of every epoch it was asked for."""
    from pipeline.bench.data import training_stream_rate

    uri, truth = digits_root
    cfg = _cfg(uri)  # data.batch_size=16: the micro-batch of 1 worker
    rate = training_stream_rate(cfg, open_dataset(cfg, "train"), 0, num_epochs=2)
    assert rate.images == 2 * len(truth) // 16 * 16 and rate.images_per_s > 0


def test_ot_coupling_in_the_loop_and_in_the_stream(digits_root):
    uri, _ = digits_root
    cfg = _cfg(uri, "data.batch_size=36", "data.coupling=ot", "data.ot_per_class=true")
    independent = next(_batches(_cfg(uri, "data.batch_size=36")))
    paired = next(_batches(cfg))
    order = np.argsort(paired["key"])
    base = np.argsort(independent["key"])

    def cost(batch, idx):
        return float(((batch["x_1"][idx] - batch["x_0"][idx]) ** 2).sum(dim=(1, 2, 3)).mean())

    assert cost(paired, order) < cost(independent, base)
    # a permutation of the same noise rows, within classes
    rows = {independent["x_0"][i].numpy().tobytes(): int(independent["label"][i]) for i in base}
    assert sorted(rows) == sorted(x.numpy().tobytes() for x in paired["x_0"])
    assert [rows[x.numpy().tobytes()] for x in paired["x_0"]] == paired["label"].tolist()
    # coupling inside a Ray Data stage (PairingStage(apply_coupling=True) on the stream's
    # rows, which redraws the same x_0 from (seed, epoch, key)): same noise multiset
    stage = PairingStage.from_config(cfg, 0, apply_coupling=True)
    staged = _keyed_stream(cfg).map_batches(stage, batch_size=36).take_all()
    assert len(staged) == 36
    drawn = sorted(r["x_0"].tobytes() for r in staged)
    assert drawn == sorted(rows)


# --------------------------------------------------------------------------- bad input
def _lab_tiff() -> bytes:
    """A TIFF in a mode the decoder refuses (no faithful conversion to L/RGB)."""
    buf = io.BytesIO()
    Image.new("LAB", (RES, RES)).save(buf, "TIFF")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR (CRC fixed) claims ``width`` x ``height``: a decompression bomb."""
    data = bytearray(_encode(np.zeros((4, 4), np.uint8)))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def _bad_dataset(root: str) -> dict[str, str]:
    """Shard 0: 5 good + 4 bad samples; shard 1 truncated; shard 2 good. Expected reasons."""
    rng = np.random.default_rng(9)

    def good(i: int) -> Sample:
        image = rng.integers(0, 256, size=(RES, RES), dtype=np.uint8)
        return f"{i:08d}", {"png": _encode(image), "cls": b"1"}

    shard0 = [good(i) for i in range(5)] + [
        ("00000005", {"png": b"\x89PNG\r\n\x1a\n garbage", "cls": b"1"}),
        ("00000006", {"cls": b"1", "json": b"{}"}),
        ("00000007", {"tiff": _lab_tiff(), "cls": b"1"}),
        ("00000008", {"png": _png_claiming(30000, 30000), "cls": b"1"}),
    ]
    full = _tar([good(i) for i in range(10, 20)])
    truncated = full[: 512 * 9 + 100]  # 4 blocks a sample: inside the 3rd one's image
    shard2 = _tar([good(i) for i in range(20, 30)])
    _write_split(root, [_tar(shard0), truncated, shard2], [9, 10, 10])
    return {
        "00000005": "undecodable",
        "00000006": "missing image",
        "00000007": "unexpected image mode 'LAB'",
        "00000008": "decompression bomb: 900,000,000 pixels",
    }


def test_bad_samples_skipped_counted_and_reported(tmp_path):
    root = str(tmp_path / "bad")
    expected = _bad_dataset(root)
    cfg = _cfg(root, "data.max_bad_fraction=0.5")
    rows = _collect(cfg)
    assert not set(expected) & set(rows)
    assert {f"{i:08d}" for i in range(5)} | {f"{i:08d}" for i in range(20, 30)} <= set(rows)
    report = bad_sample_tracker(cfg, open_dataset(cfg, "train"), 0).check()
    assert report.total == 29 and report.skipped == 29 - len(rows) and not report.exceeded
    found = {r.key: (r.shard, r.reason) for r in report.records if r.key}
    for key, reason in expected.items():
        assert found[key][0] == "shard-000000.tar" and reason in found[key][1]
    broken = report.shards["shard-000001.tar"]
    assert broken.lost > 0 and "truncated or corrupt tar" in broken.error
    assert broken.ok + broken.bad + broken.lost == 10
    assert report.worst(1)[0].shard in ("shard-000000.tar", "shard-000001.tar")


def test_a_clean_pass_overwrites_an_earlier_bad_record(tmp_path):
    """A clean shard's record is sent without waiting, but still replaces the record of an
    earlier pass over the same shard that lost samples (say, to a transient read error)."""
    root = str(tmp_path / "bad")
    _bad_dataset(root)
    cfg = _cfg(root, "data.max_bad_fraction=0.5")
    tracker = bad_sample_tracker(cfg, open_dataset(cfg, "train"), epoch=7)
    tracker.record(ShardStats("shard-000002.tar", 10, ok=0, lost=10, error="read timed out"))
    assert tracker.report().skipped == 10
    tracker.record(ShardStats("shard-000002.tar", 10, ok=10))  # not waited for
    report = tracker.report()  # sent after it by the same process: runs after it
    assert report.skipped == 0 and report.shards["shard-000002.tar"].ok == 10


def test_bad_sample_counts_keep_running_totals_that_match_a_recount():
    """Random records, overwrites and epochs: the O(1) running totals say what a full
    recount of the stored records says, after every record."""
    from pipeline.data.stream import BadSampleCounts

    rng = np.random.default_rng(0)
    counts = BadSampleCounts(total=400, max_bad_fraction=0.05)
    outcomes = set()
    for _ in range(600):
        epoch, shard = int(rng.integers(0, 3)), f"shard-{int(rng.integers(0, 40)):06d}.tar"
        ok, bad = int(rng.integers(0, 11)), int(rng.integers(0, 3)) * int(rng.random() < 0.2)
        lost = int(rng.random() < 0.05) * (10 - ok)
        exceeded, summary = counts.record(epoch, ShardStats(shard, 10, ok=ok, bad=bad, lost=lost))
        report = counts.report(epoch)
        seen = sum(s.ok + s.bad + s.lost for s in report.shards.values())
        assert report.total == max(400, seen)
        assert exceeded == report.exceeded  # BadSampleReport recounts every shard
        assert (summary == report.summary()) if exceeded else summary == ""
        outcomes.add(exceeded)
    assert outcomes == {True, False}  # both sides of the limit were exercised


def test_the_bad_sample_counter_actor_imports_no_heavy_library():
    """The counter runs as an actor in its own process, which imports the module of the
    class it wraps: that module must load neither torch, Ray Data nor SciPy (seconds of CPU per
    training job from ``pipeline.data.stream``, for a process that adds integers)."""
    import subprocess
    import sys

    import pipeline.data.stream as stream

    module = stream._BadSampleCounter.__ray_metadata__.modified_class.__module__
    probe = (
        f"import sys, {module}; "
        "print(sorted(m for m in ('torch', 'ray.data', 'scipy', 'numpy') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert module == "pipeline.data.bad_samples"
    assert loaded == "[]", f"{module} loads {loaded}"


def test_too_many_bad_samples_stops_naming_the_worst_shard(tmp_path):
    root = str(tmp_path / "bad")
    _bad_dataset(root)
    with pytest.raises(TooManyBadSamples, match=r"worst shards: shard-00000[01]\.tar") as info:
        _collect(_cfg(root))  # default max_bad_fraction: 1%
    assert info.value.report is not None and info.value.report.exceeded


def test_missing_or_empty_dataset_fails_fast(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="does not exist") as err:
        open_dataset(_cfg(missing), "train")
    assert missing in str(err.value)
    with pytest.raises(DatasetError, match=r"data\.uri is empty"):
        open_dataset(build_config(), "train")
    root = tmp_path / "empty"
    _write_split(str(root), [], [])
    with pytest.raises(DatasetError, match="is empty") as err:
        _keyed_stream(_cfg(str(root)))
    assert str(root) in str(err.value)
    with pytest.raises(DatasetError, match="no 'val' split"):
        _batches(_cfg(str(root)), split="val")  # raises before iterating
    shards, _ = _digits(2, 3)
    _write_split(str(tmp_path / "holes"), shards, [3, 3])
    (tmp_path / "holes" / "train" / shard_name(1)).unlink()
    with pytest.raises(DatasetError, match=r"missing .*shard-000001\.tar"):
        open_dataset(_cfg(str(tmp_path / "holes")), "train")


def test_missing_bucket_fails_fast(s3_server):
    with pytest.raises(Exception, match="nonexistent-bucket-xyz"):
        open_dataset(_cfg("s3://nonexistent-bucket-xyz/ds"), "train")
