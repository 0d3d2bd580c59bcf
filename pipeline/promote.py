"""``fmpipe retrain --candidate MODEL``: judge a version that is already registered (a reflow,
a distilled student) against the champion, and promote it when it wins at the champion's
NFE budget or fewer.

Retraining (:mod:`pipeline.retrain`) makes its candidate from new data. A reflowed or
distilled version is made from the champion itself (``fmpipe reflow``), on the same data;
what it offers is quality at fewer steps. So it is judged as users will sample it:

1. **The champion** at its own sampling rule: its version's ``fmpipe.sample.solver`` /
   ``fmpipe.sample.steps`` tags, else ``eval.solver`` x ``eval.steps``. Its budget is the NFE
   per sample that rule spent, ``NFE_c``; its quality the Fréchet distance ``FD_c`` of
   ``retrain.metric`` (``fd_classifier`` or ``fid``: a reflow's velocity answers another
   coupling than the data's, so the validation loss does not rank it).
2. **The candidate** at its own rule (a K-step student's K Euler steps), else at the
   champion's, on the same ``eval.seed`` noise against the same reference: ``NFE``, ``FD``.
3. **Promoted** when ``NFE <= NFE_c`` and ``FD < FD_c - retrain.promote_margin``, by the
   compare-and-set of :func:`pipeline.retrain.promote_if_unchanged` under the same lease as
   retraining (so a scheduled retrain and this never both move the alias); otherwise tagged
   ``rejected`` with both figures.

The candidate's version gets the tags ``<metric>`` / ``champion_<metric>``,
``fmpipe.retrain.nfe`` / ``champion_nfe`` / ``sampling`` / ``champion_sampling``,
``fmpipe.retrain.base_version`` (the champion judged against) and
``fmpipe.retrain.decision``; one already decided against the current champion is not scored
again ("already_evaluated").
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.lease import Heartbeat, open_lease
from pipeline.registry import (
    Champion,
    lookup_version,
    parse_models_uri,
    read_champion,
    registry_client,
)
from pipeline.retrain import (
    TAG_BASE,
    TAG_DECISION,
    TAG_REJECTED,
    RetrainResult,
    promote_if_unchanged,
    record_outcome,
)
from pipeline.sample.source import sampling_rule_from_tags

__all__ = ["Budget", "judge_candidate"]

TAG_NFE = "fmpipe.retrain.nfe"
TAG_CHAMPION_NFE = "fmpipe.retrain.champion_nfe"


@dataclass(frozen=True)
class Budget:
    """One model's evaluation: the rule it was sampled with and what it reached."""

    model: str  # models:/<name>/<version>
    solver: str
    steps: int
    nfe: float  # network evaluations per sample, as spent
    fd: float  # retrain.metric's Fréchet distance

    @property
    def rule(self) -> str:
        return f"{self.solver} x {self.steps}"


def verdict(candidate: Budget, champion: Budget, margin: float, metric: str) -> tuple[bool, str]:
    """``(promote, reason when not)``: fewer or equal NFE and a lower FD by ``margin``."""
    if candidate.nfe > champion.nfe:
        return False, (
            f"it needs {candidate.nfe:g} NFE per sample ({candidate.rule}), more than the "
            f"champion's budget of {champion.nfe:g} ({champion.rule})"
        )
    if not candidate.fd < champion.fd - margin:
        return False, (
            f"{metric} {candidate.fd:.5f} at {candidate.nfe:g} NFE ({candidate.rule}) is not "
            f"below the champion's {champion.fd:.5f} at {champion.nfe:g} NFE ({champion.rule})"
            + (f" - margin {margin:g}" if margin else "")
        )
    return True, ""


def _check(cfg: Config, client: Any) -> tuple[str, str]:
    """``(registered name, candidate version)`` from ``retrain.candidate``, or a ConfigError."""
    uri = cfg.retrain.candidate.strip()
    if cfg.retrain.metric == "val_loss":
        raise ConfigError(
            "retrain.metric=val_loss cannot judge a registered candidate such as a reflow or "
            "a distilled student (its velocity answers another coupling than the data's): "
            "set retrain.metric=fd_classifier or retrain.metric=fid"
        )
    try:
        name, alias, version = parse_models_uri(uri)
    except ValueError as exc:
        raise ConfigError(f"retrain.candidate: {exc}") from None
    own = cfg.train.registered_model_name.strip()
    if own and own != name:
        raise ConfigError(
            f"retrain.candidate '{uri}' is not a version of train.registered_model_name "
            f"'{own}': the '{cfg.retrain.alias}' alias of {own} can point only at its own "
            "versions"
        )
    found = lookup_version(client, name, alias, version, where=str(cfg.tracking.uri))
    return name, str(found.version)


def judge_candidate(
    cfg: Config, *, print_fn: Callable[[str], None] | None = print
) -> RetrainResult:
    """Score ``retrain.candidate`` against the champion; promote it when it wins (module doc).

    Raises:
        ConfigError: no sample metric, or a candidate of another registered model.
        pipeline.registry.ModelNotFound: the candidate does not exist.
    """
    say = print_fn or (lambda _line: None)
    client = registry_client(cfg)
    name, version = _check(cfg, client)
    alias = cfg.retrain.alias

    def result(outcome: Any, message: str, champion: str | None, **kw: Any) -> RetrainResult:
        say(f"[retrain] {message}")
        record_outcome(client, name, outcome, message)
        return RetrainResult(outcome, message, name, "", champion_version=champion,
                             candidate_version=version, **kw)  # fmt: skip

    def settled(champion: str | None) -> RetrainResult | None:
        if champion == version:
            return result("already_evaluated",
                          f"{name} version {version} is already '{alias}'; nothing to judge",
                          champion)  # fmt: skip
        tags = dict(client.get_model_version(name, version).tags or {})
        if (
            champion is not None
            and tags.get(TAG_BASE) == champion
            and tags.get(TAG_DECISION) in ("promoted", "rejected")
        ):
            return result(
                "already_evaluated",
                f"{name} version {version} was already judged against '{alias}' version "
                f"{champion}: {tags[TAG_DECISION]}"
                + (f" ({tags[TAG_REJECTED]})" if tags.get(TAG_REJECTED) else ""),
                champion,
            )
        return None

    champion = read_champion(client, name, alias)
    early = settled(champion.version if champion else None)
    if early is not None:
        return early
    lease = open_lease(cfg, name, alias)
    if not lease.acquire():
        message = f"busy: another retrain of {name}@{alias} holds {lease.uri}; try again later"
        say(f"[retrain] {message}")
        return RetrainResult("busy", message, name, "", candidate_version=version)
    try:
        with Heartbeat(lease, lease.ttl):
            champion = read_champion(client, name, alias)  # authoritative, under the lease
            early = settled(champion.version if champion else None)
            if early is not None:
                return early
            return _judge(cfg, client, lease, name, version, champion, say, result)
    finally:
        lease.release()


def _judge(
    cfg: Config, client: Any, lease: Any, name: str, version: str, champion: Champion | None,
    say: Callable[[str], None], result: Callable[..., RetrainResult],
) -> RetrainResult:  # fmt: skip
    """Under the lease: score both, tag the candidate, compare-and-set the alias."""
    from pipeline.eval.job import score_models_at
    from pipeline.redact import scrub

    alias, metric, margin = cfg.retrain.alias, cfg.retrain.metric, cfg.retrain.promote_margin
    cand_tags = dict(client.get_model_version(name, version).tags or {})
    cand_uri = f"models:/{name}/{version}"
    if champion is None:  # nothing to beat: the first champion, as retraining makes it
        status, reason = promote_if_unchanged(client, name, alias, version, None, lease)
        decision = "promoted" if status == "promoted" else "rejected"
        client.set_model_version_tag(name, version, TAG_BASE, "none")
        client.set_model_version_tag(name, version, TAG_DECISION, decision)
        message = (f"promoted {name} version {version} to '{alias}' (there was none)"
                   if decision == "promoted" else f"not promoted: {reason}")  # fmt: skip
        return result(decision, message, None)
    champ_uri = f"models:/{name}/{champion.version}"
    champ_rule = sampling_rule_from_tags(champion.tags) or (cfg.eval.solver, int(cfg.eval.steps))
    cand_rule = sampling_rule_from_tags(cand_tags) or champ_rule
    say(f"[retrain] judging {cand_uri} ({cand_rule[0]} x {cand_rule[1]}) against "
        f"{name}@{alias} = version {champion.version} ({champ_rule[0]} x {champ_rule[1]}) "
        f"by {metric} of {cfg.eval.num_samples} samples each")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fmpipe-judge-") as tmp:
        points = score_models_at(cfg, metric, [(cand_uri, *cand_rule), (champ_uri, *champ_rule)],
                                 out_root=f"{tmp}/eval", say=lambda _line: None)  # fmt: skip
    cand, champ = (Budget(p.model, p.solver, p.steps, p.nfe, p.scores.fd) for p in points)
    say(f"[retrain] {metric}: candidate {cand.fd:.5f} at {cand.nfe:g} NFE, champion "
        f"{champ.fd:.5f} at {champ.nfe:g} NFE")  # fmt: skip
    client_tags = {
        metric: f"{cand.fd:.6g}",
        f"champion_{metric}": f"{champ.fd:.6g}",
        TAG_NFE: f"{cand.nfe:g}",
        TAG_CHAMPION_NFE: f"{champ.nfe:g}",
        "fmpipe.retrain.sampling": cand.rule,
        "fmpipe.retrain.champion_sampling": champ.rule,
        "fmpipe.retrain.metric": metric,
        "fmpipe.retrain.margin": f"{margin:g}",
        TAG_BASE: champion.version,
        TAG_DECISION: "pending",
    }
    for key, value in client_tags.items():
        client.set_model_version_tag(name, version, key, value)
    better, reason = verdict(cand, champ, margin, metric)
    status = "not_better"
    if better:
        status, reason = promote_if_unchanged(client, name, alias, version, champion.version,
                                              lease)  # fmt: skip
    promoted = status == "promoted"
    decision = "promoted" if promoted else "aborted" if status == "lease_lost" else "rejected"
    client.set_model_version_tag(name, version, TAG_DECISION, decision)
    if promoted:
        message = (f"promoted {name} version {version} to '{alias}' ({metric} {cand.fd:.5f} at "
                   f"{cand.nfe:g} NFE < {champ.fd:.5f} at {champ.nfe:g} NFE, was version "
                   f"{champion.version})")  # fmt: skip
    else:
        client.set_model_version_tag(name, version, TAG_REJECTED, scrub(reason))
        message = f"rejected {name} version {version}: {reason}; '{alias}' stays at version " + (
            champion.version
        )
    return result("promoted" if promoted else "rejected", message, champion.version,
                  extra={"candidate": cand, "champion": champ})  # fmt: skip
