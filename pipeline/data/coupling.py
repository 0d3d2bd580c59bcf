"""Pairing data with noise: ``x_0 ~ N(0, I)``, ``t`` from the time sampler, and coupling.

Reproducibility. Every sample's noise and time come from its own generator, seeded by
``(seed, epoch, key)`` through a hash (:func:`sample_seed`); keys are unique across a
dataset. So the triple ``(x_1, x_0, t)`` of a sample depends on the config and the epoch
only, never on how Ray Data slices blocks into batches, how many workers read, or in which
order shards finish. ``x_0`` is drawn before ``t`` from that generator, so changing the
time sampler leaves the noise unchanged.

Coupling. ``independent`` keeps the drawn pairs. ``ot`` re-pairs inside a batch by exact
minibatch optimal transport on squared L2: the assignment problem
``min_P sum_i ||x_1[i] - x_0[P(i)]||^2`` over permutations ``P``, solved by
``scipy.optimize.linear_sum_assignment`` (Jonker-Volgenant, O(B^3)). Unlike a plan sampled
from the Sinkhorn/EMD coupling matrix, a permutation neither duplicates nor drops a noise
sample, so the batch's noise stays an exact i.i.d. N(0, I) draw. With ``per_class`` the
assignment runs inside each label group only (``label == -1``, unlabelled, is one group),
so a class-conditional model sees noise paired with data of its own class only.

Where it runs. The assignment must be solved on the batch the model sees. Ray Data's
``map_batches`` batches are not the batches a consumer gets from ``iter_torch_batches``
(blocks are re-sliced, and Ray Train splits the stream across workers), so:

- :class:`PairingStage` (a ``map_batches`` callable) always adds ``x_0`` and ``t``, and
  applies the coupling only when built with ``apply_coupling=True``: right for a consumer
  that trains on Ray's batches as they are;
- :func:`couple` does the same on a torch batch in the train loop: exact for the batch
  being trained on. :class:`pipeline.train.data.RayDataSource` uses it.

Noise storage. ``x_0`` leaves the stage as ``data.noise_dtype``: float32, float16 (half the
bytes through the object store) or bfloat16. NumPy and Arrow have no bfloat16, so bfloat16
noise travels as its int16 bit pattern; :func:`noise_to_float` turns any stored ``x_0``
back into float32 on the consumer side.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.flow.time_samplers import TimeSampler, build_time_sampler

__all__ = [
    "COUPLINGS",
    "NOISE_DTYPES",
    "PairingStage",
    "couple",
    "draw_noise_and_time",
    "noise_to_float",
    "ot_permutation",
    "sample_generator",
    "sample_seed",
]

COUPLINGS = ("independent", "ot")
NOISE_DTYPES = ("float32", "float16", "bfloat16")


# --------------------------------------------------------------------------- seeding
def sample_seed(seed: int, epoch: int, key: str, stream: str = "pair") -> int:
    """A 63-bit seed for one sample: blake2b of ``(stream, seed, epoch, key)``.

    ``stream`` separates independent uses (``"pair"`` for noise + time, ``"flip"`` for
    augmentation), so turning one on or off never shifts the other's draws.
    """
    text = f"{stream}\x1f{int(seed)}\x1f{int(epoch)}\x1f{key}".encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generator(seed: int, epoch: int, key: str, stream: str = "pair") -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`sample_seed`."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, key, stream))


def draw_noise_and_time(
    keys: Iterable[str],
    shape: Sequence[int],
    seed: int,
    epoch: int,
    time_sampler: TimeSampler,
) -> tuple[Tensor, Tensor]:
    """Per-sample ``x_0 ~ N(0, I)`` of ``shape`` and ``t`` for each key.

    Returns:
        ``x_0`` float32 ``(B, *shape)`` and ``t`` float32 ``(B,)``; row ``i`` depends only on
        ``(seed, epoch, keys[i])`` (and the sampler for ``t``).
    """
    keys = list(keys)
    x_0 = torch.empty((len(keys), *shape), dtype=torch.float32)
    t = torch.empty(len(keys), dtype=torch.float32)
    for i, key in enumerate(keys):
        generator = sample_generator(seed, epoch, key)
        torch.randn(tuple(shape), generator=generator, out=x_0[i])
        t[i] = time_sampler.sample(1, generator=generator)[0]
    return x_0, t


# --------------------------------------------------------------------------- coupling
def _flat64(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


@functools.cache
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - comes with scikit-learn
        return None
    return ThreadpoolController()


def _one_blas_thread() -> Any:
    """Single-threaded BLAS for the small cost matmul: on a busy node (Ray Data tasks
    beside a training worker) a multi-threaded OpenBLAS call of this size was measured
    10x slower than one thread."""
    controller = _blas_controller()
    if controller is None:  # pragma: no cover
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


def _assignment(x_1: np.ndarray, x_0: np.ndarray) -> np.ndarray:
    """Column index assigned to each row for the squared-L2 cost (rows are x_1)."""
    with _one_blas_thread():
        cross = x_1 @ x_0.T
    cost = (
        np.einsum("ij,ij->i", x_1, x_1)[:, None]
        + np.einsum("ij,ij->i", x_0, x_0)[None, :]
        - 2.0 * cross
    )
    # imported here: scipy.optimize costs ~0.5 s of import in every Ray Data and training
    # worker process, and only the OT coupling needs it
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    out = np.empty(len(rows), dtype=np.int64)
    out[rows] = cols
    return out


def ot_permutation(
    x_1: Tensor | np.ndarray,
    x_0: Tensor | np.ndarray,
    label: Tensor | np.ndarray | None = None,
    per_class: bool = False,
) -> Tensor:
    """The permutation ``perm`` (LongTensor ``(B,)``) minimising
    ``sum_i ||x_1[i] - x_0[perm[i]]||^2``.

    With ``per_class`` and ``label`` (``(B,)``, ``-1`` = unlabelled), ``perm[i]`` only
    ranges over samples with ``label == label[i]``, so ``label[perm] == label``.
    ``sorted(perm) == arange(B)`` always: a noise sample is never duplicated or dropped.
    """
    if len(x_1) != len(x_0):
        raise ValueError(f"x_1 and x_0 differ in batch size: {len(x_1)} vs {len(x_0)}")
    a, b = _flat64(x_1), _flat64(x_0)
    if a.shape != b.shape:
        raise ValueError(f"x_1 and x_0 differ in shape: {a.shape} vs {b.shape}")
    n = len(a)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if not per_class or label is None:
        return torch.from_numpy(_assignment(a, b))
    labels = np.asarray(label.cpu() if isinstance(label, Tensor) else label).reshape(-1)
    if len(labels) != n:
        raise ValueError(f"label has {len(labels)} entries for a batch of {n}")
    perm = np.empty(n, dtype=np.int64)
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        perm[idx] = idx[_assignment(a[idx], b[idx])]
    return torch.from_numpy(perm)


def couple(
    x_1: Tensor,
    x_0: Tensor,
    label: Tensor | None = None,
    method: str = "independent",
    per_class: bool = False,
) -> Tensor:
    """``x_0`` re-paired with ``x_1`` by ``method`` (``"independent"``: unchanged).

    For the train loop: call it on the batch the model is about to see. Returns a tensor of
    ``x_0``'s dtype and device; ``x_1``, ``label`` and ``t`` keep their order.
    """
    if method == "independent":
        return x_0
    if method != "ot":
        raise ValueError(f"unknown coupling {method!r}; allowed: {', '.join(COUPLINGS)}")
    perm = ot_permutation(x_1, noise_to_float(x_0), label, per_class)
    return x_0[perm.to(x_0.device)]


# --------------------------------------------------------------------------- storage dtype
def _store_noise(x_0: Tensor, noise_dtype: str) -> np.ndarray:
    if noise_dtype == "float32":
        return x_0.numpy()
    if noise_dtype == "float16":
        return x_0.to(torch.float16).numpy()
    if noise_dtype == "bfloat16":
        return x_0.to(torch.bfloat16).view(torch.int16).numpy()
    raise ValueError(f"unknown noise_dtype {noise_dtype!r}; allowed: {', '.join(NOISE_DTYPES)}")


def noise_to_float(x_0: Tensor) -> Tensor:
    """Stored ``x_0`` -> float32; int16 input is read as bfloat16 bits (see module doc).

    A 16-bit CPU batch is converted one sample at a time, on the calling thread: each
    sample stays under torch's parallel grain (32,768 elements, a 3x104x104 image). A
    batch-wide conversion goes parallel, and on the consumer thread of a busy node its
    OpenMP threads spun against the decode tasks: the consumer took 45-50% of a core
    instead of ~28% at 64x64 (py-spy: most of it here).
    """
    if x_0.dtype == torch.int16:
        x_0 = x_0.view(torch.bfloat16)
    if x_0.dtype == torch.float32 or x_0.device.type != "cpu" or x_0.ndim < 2:
        return x_0.float()
    out = torch.empty(x_0.shape, dtype=torch.float32)
    for row in range(len(x_0)):
        out[row].copy_(x_0[row])
    return out


# --------------------------------------------------------------------------- Ray Data stage
class PairingStage:
    """``map_batches`` callable: adds ``x_0`` (``noise_dtype``) and ``t`` (float32) per row.

    Input batch (numpy format): ``x_1`` float32 ``(B, C, H, W)``, ``key`` str ``(B,)``,
    ``label`` int64 ``(B,)``. With ``apply_coupling`` and ``coupling="ot"`` the batch's
    ``x_0`` rows are permuted by :func:`ot_permutation` (within classes if ``per_class``).
    Picklable and stateless apart from the sampler: use it with the task compute strategy.
    """

    def __init__(
        self,
        *,
        seed: int,
        epoch: int,
        time_sampler: str = "uniform",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        noise_dtype: str = "float32",
        coupling: str = "independent",
        per_class: bool = False,
        apply_coupling: bool = False,
    ) -> None:
        if coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling {coupling!r}; allowed: {', '.join(COUPLINGS)}")
        if noise_dtype not in NOISE_DTYPES:
            allowed = ", ".join(NOISE_DTYPES)
            raise ValueError(f"unknown noise_dtype {noise_dtype!r}; allowed: {allowed}")
        self.seed, self.epoch = int(seed), int(epoch)
        self.time_sampler = time_sampler
        self.time_mean, self.time_std = float(time_mean), float(time_std)
        self.noise_dtype = noise_dtype
        self.coupling, self.per_class = coupling, bool(per_class)
        self.apply_coupling = bool(apply_coupling)
        self._sampler = build_time_sampler(time_sampler, mean=time_mean, std=time_std)

    def _draw(
        self, keys: list[str], shape: Sequence[int], epochs: np.ndarray | None
    ) -> tuple[Tensor, Tensor]:
        """Each row's draws from ``(seed, epoch, key)``: the stage's epoch, or the row's own
        ``epoch`` column in a multi-epoch stream."""
        if epochs is None or len(epochs) == 0:
            return draw_noise_and_time(keys, shape, self.seed, self.epoch, self._sampler)
        epochs = np.asarray(epochs)
        if (epochs == epochs[0]).all():  # the rule: a block comes from one shard of one epoch
            return draw_noise_and_time(keys, shape, self.seed, int(epochs[0]), self._sampler)
        x_0 = torch.empty((len(keys), *shape), dtype=torch.float32)
        t = torch.empty(len(keys), dtype=torch.float32)
        for epoch in np.unique(epochs):
            rows = np.flatnonzero(epochs == epoch)
            part = [keys[i] for i in rows]
            index = torch.from_numpy(rows)
            x_0[index], t[index] = draw_noise_and_time(
                part, shape, self.seed, int(epoch), self._sampler
            )
        return x_0, t

    @classmethod
    def from_config(cls, cfg: Any, epoch: int, apply_coupling: bool = False) -> PairingStage:
        """Build from a :class:`pipeline.config.Config` (``seed``, ``data.*``, ``flow.*``)."""
        return cls(
            seed=cfg.seed,
            epoch=epoch,
            time_sampler=cfg.flow.time_sampler,
            time_mean=cfg.flow.logit_normal_mean,
            time_std=cfg.flow.logit_normal_std,
            noise_dtype=cfg.data.noise_dtype,
            coupling=cfg.data.coupling,
            per_class=cfg.data.ot_per_class,
            apply_coupling=apply_coupling,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x_1 = np.asarray(batch["x_1"])
        keys = [str(k) for k in batch["key"]]
        x_0, t = self._draw(keys, x_1.shape[1:], batch.get("epoch"))
        if self.apply_coupling and self.coupling == "ot" and len(keys) > 1:
            perm = ot_permutation(x_1, x_0, batch.get("label"), self.per_class)
            x_0 = x_0[perm]
        out = dict(batch)
        out["x_0"] = _store_noise(x_0, self.noise_dtype)
        out["t"] = t.numpy()
        return out

    def __repr__(self) -> str:
        return (
            f"PairingStage(seed={self.seed}, epoch={self.epoch}, "
            f"time_sampler={self.time_sampler!r}, noise_dtype={self.noise_dtype!r}, "
            f"coupling={self.coupling!r}, per_class={self.per_class}, "
            f"apply_coupling={self.apply_coupling})"
        )
