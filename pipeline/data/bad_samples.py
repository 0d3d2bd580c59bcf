"""Bad-sample bookkeeping of one dataset split: per-shard stats, the epoch's report, the
counter behind the named actor every decode task reports to.

Standard library only, on purpose: the counter runs as a Ray actor (``pipeline.data.stream``
wraps :class:`BadSampleCounts` in ``ray.remote``), and an actor's process imports the module
that defines its class. From ``pipeline.data.stream`` that meant torch, Ray Data and SciPy:
seconds of CPU (its import took 8.6 s on the loaded 2-core VM) in a process that only adds
integers, paid in every training job
(``tests/test_stream.py`` checks that importing this module loads none of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BadSampleCounts", "BadSampleRecord", "BadSampleReport", "ShardStats"]


@dataclass(frozen=True)
class BadSampleRecord:
    shard: str
    key: str  # "" when the damage hides the key (e.g. an unreadable tar header)
    reason: str


@dataclass
class ShardStats:
    shard: str
    declared: int  # samples the manifest promises
    ok: int = 0  # decoded and emitted
    bad: int = 0  # read but skipped (see examples)
    lost: int = 0  # never read: the tar ended or broke first
    error: str = ""  # why the tar could not be read to its end
    examples: list[BadSampleRecord] = field(default_factory=list)
    read_failed: bool = False  # storage could not deliver it (transient: a retry may help)

    @property
    def skipped(self) -> int:
        return self.bad + self.lost


@dataclass
class BadSampleReport:
    total: int  # denominator: manifest count (or more, if shards held extra samples)
    max_bad_fraction: float
    shards: dict[str, ShardStats] = field(default_factory=dict)  # shards read so far

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.shards.values())

    @property
    def fraction(self) -> float:
        return self.skipped / self.total if self.total else 0.0

    @property
    def exceeded(self) -> bool:
        return self.fraction > self.max_bad_fraction

    @property
    def transient(self) -> bool:
        """Some shard was lost to a failed read (storage down?), so a retry may pass."""
        return any(s.read_failed for s in self.shards.values())

    @property
    def records(self) -> list[BadSampleRecord]:
        return [r for s in self.shards.values() for r in s.examples]

    def worst(self, n: int = 3) -> list[ShardStats]:
        ranked = sorted(self.shards.values(), key=lambda s: (-s.skipped, s.shard))
        return [s for s in ranked if s.skipped][:n]

    def summary(self) -> str:
        head = (
            f"{self.skipped} of {self.total} samples ({self.fraction:.2%}) skipped as bad "
            f"(data.max_bad_fraction={self.max_bad_fraction:g})"
        )
        parts = []
        for s in self.worst():
            what = f"{s.bad} bad, {s.lost} lost" if s.lost else f"{s.bad} bad"
            detail = s.error or (s.examples[0].reason if s.examples else "")
            key = next((r.key for r in s.examples if r.key), "")
            example = f"; e.g. key {key}" if key else ""
            parts.append(f"{s.shard} ({what}: {detail}{example})")
        return head + ("; worst shards: " + ", ".join(parts) if parts else "")


_KEEP_EPOCHS = 8  # reported epochs a counter keeps
_MAX_EPOCHS = 1024  # epochs a counter keeps at most (reported or not)


class BadSampleCounts:
    """Per-epoch, per-shard stats of one dataset split; records overwrite by shard.

    Keeps each epoch's running totals (samples seen, skipped), so one record costs O(1)
    however many shards an epoch has, and the summary (a sort over the shards) is only
    built when the limit is passed: one record per shard would otherwise cost O(shards),
    O(shards^2) per epoch, in the single counter every decode task reports to.
    """

    def __init__(self, total: int, max_bad_fraction: float) -> None:
        self._declared = total
        self._max_bad_fraction = max_bad_fraction
        self._epochs: dict[int, BadSampleReport] = {}
        self._totals: dict[int, list[int]] = {}  # epoch -> [seen, skipped]
        self._reported: set[int] = set()  # epochs whose report was asked for

    def _epoch(self, epoch: int) -> BadSampleReport:
        if epoch not in self._epochs:
            self._epochs[epoch] = BadSampleReport(self._declared, self._max_bad_fraction)
            self._totals[epoch] = [0, 0]
            # Forget the oldest epochs already reported, never the one asked for: the stream
            # decodes epochs ahead of the trainer (many, for a small dataset), and an epoch
            # dropped before its report would read as "0 bad" or, once, as a KeyError.
            # _MAX_EPOCHS bounds the memory if reports never come.
            reported = sorted(e for e in self._reported if e != epoch)
            for old in reported[: max(0, len(self._epochs) - _KEEP_EPOCHS)]:
                del self._epochs[old], self._totals[old]
                self._reported.discard(old)
            for old in sorted(e for e in self._epochs if e != epoch)[:-_MAX_EPOCHS]:
                del self._epochs[old], self._totals[old]
        return self._epochs[epoch]

    def record(self, epoch: int, stats: ShardStats) -> tuple[bool, str]:
        """Store one shard's stats; ``(over the limit, summary if over it else "")``."""
        report = self._epoch(epoch)
        totals = self._totals[epoch]
        for sign, shard in ((-1, report.shards.get(stats.shard)), (1, stats)):
            if shard is not None:
                totals[0] += sign * (shard.ok + shard.bad + shard.lost)
                totals[1] += sign * shard.skipped
        report.shards[stats.shard] = stats
        report.total = max(self._declared, totals[0])
        exceeded = totals[1] / report.total > self._max_bad_fraction if report.total else False
        return exceeded, report.summary() if exceeded else ""

    def report(self, epoch: int) -> BadSampleReport:
        self._reported.add(epoch)
        return self._epoch(epoch)
