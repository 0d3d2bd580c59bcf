"""Coupled sample sets (issue 16): what a reader refuses, without Ray (local directories)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.manifest import MANIFEST_NAME, Manifest, ShardInfo
from pipeline.data.pairs import PairSet, PairSetError, open_pair_set, read_pair_shard
from pipeline.sample.determinism import sample_noise
from pipeline.sample.shards import X1_SUFFIX, npy_bytes, sample_members, tar_bytes
from pipeline.storage import resolve


def _manifest(tmp: Path, **extra) -> Path:
    manifest = Manifest(
        split="samples", resolution=4, channels=1, image_format="png",
        shards=[ShardInfo("shard-000000.tar", 2, "0" * 64)],
        extra={"seed": 5, "data_shape": [1, 4, 4], "num_classes": 0, **extra},
    )  # fmt: skip
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    return tmp


def test_a_sample_output_without_pairs_or_without_a_manifest_is_refused_by_name(tmp_path):
    with pytest.raises(PairSetError, match=r"'.*empty' holds no _manifest\.json"):
        open_pair_set(resolve(str(tmp_path / "empty")))
    plain = _manifest(tmp_path / "plain")
    with pytest.raises(PairSetError, match=r"not a coupled sample set.*--pairs"):
        open_pair_set(resolve(str(plain)))
    pair_set = open_pair_set(resolve(str(_manifest(tmp_path / "pairs", pairs=True))))
    assert (pair_set.seed, pair_set.data_shape, pair_set.num_pairs) == (5, (1, 4, 4), 2)


def _shard(x_1s: dict[int, bytes | None]) -> bytes:
    members = []
    for index, x_1 in x_1s.items():
        members += sample_members(index, b"png", {"index": index}, None, x_1=x_1)
    return tar_bytes(members)


def test_pairs_read_back_with_regenerated_noise_and_bad_members_are_named():
    pair_set = PairSet("mem://set", Manifest("samples", 4, 1, "png"), 5, (1, 4, 4), 0)
    x_1 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    data = _shard({7: npy_bytes(x_1[0].numpy()), 8: npy_bytes(x_1[1].numpy())})
    pairs = read_pair_shard(data, pair_set, "shard-000000.tar")
    assert pairs["index"].tolist() == [7, 8] and pairs["label"].tolist() == [-1, -1]
    assert torch.equal(pairs["x_1"], x_1)
    assert torch.equal(pairs["x_0"], sample_noise(5, [7, 8], (1, 4, 4)))

    with pytest.raises(PairSetError, match=f"sample 0000000008 has no {X1_SUFFIX}"):
        read_pair_shard(_shard({7: npy_bytes(x_1[0].numpy()), 8: None}), pair_set, "s")
    wrong = npy_bytes(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(PairSetError, match=r"float32 \(1, 8, 8\), expected float32 \(1, 4, 4\)"):
        read_pair_shard(_shard({7: wrong}), pair_set, "s")
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(PairSetError, match=r"not a plain \.npy array"):
        read_pair_shard(_shard({7: pickled.getvalue()}), pair_set, "s")
