"""Training pieces without Ray: EMA, checkpoints, batch layout, validation loss, the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import TINY_UNET

from pipeline.checkpoint import (
    CheckpointError,
    TrainState,
    load_checkpoint,
    load_for_inference,
    load_state_into,
    read_state,
    save_checkpoint,
)
from pipeline.config import ConfigError, build_config
from pipeline.models import build_model
from pipeline.optim import adamw, load_adamw_state
from pipeline.train.data import InMemorySource, SourceContext, ValSet
from pipeline.train.ema import EMA, ema_beta
from pipeline.train.events import sample_grid
from pipeline.train.spec import micro_batch_size
from pipeline.train.validate import constant_predictor_loss, validation_loss


def tiny_config(**model):
    return build_config(
        {"data": {"resolution": 8}, "model": {**TINY_UNET, "num_classes": 3, **model}}
    )


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


# --------------------------------------------------------------------------- EMA
def test_ema_beta_halflife_and_warmup():
    # without warm-up: one half-life of images halves the weight of the past
    assert ema_beta(10**9, 500, 500, 0.0) == pytest.approx(0.5)
    assert ema_beta(10**9, 100, 500, 0.0) == pytest.approx(0.5 ** (100 / 500))
    # warm-up caps the half-life at ratio * images_seen
    assert ema_beta(1000, 100, 50_000, 0.1) == pytest.approx(0.5 ** (100 / 100))
    assert ema_beta(10**7, 100, 50_000, 0.1) == pytest.approx(0.5 ** (100 / 50_000))
    # first step: beta ~ 0, the EMA becomes the network
    assert ema_beta(128, 128, 50_000, 0.05) < 1e-6


def test_ema_update_is_the_documented_average():
    cfg = tiny_config()
    net = build_model(cfg.model, (1, 8, 8))
    ema = EMA(net, halflife_images=64, warmup_ratio=0.0)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    perturbed(net)
    beta = ema.update(net, images_seen=10_000, images_per_step=64)
    assert beta == pytest.approx(0.5)
    for name, p in net.named_parameters():
        expected = 0.5 * before[name] + 0.5 * p.detach()
        torch.testing.assert_close(ema.state_dict()[name], expected)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())


# --------------------------------------------------------------------------- optimizer
def test_adamw_is_fused_on_the_cpu_and_takes_torchs_default_steps():
    cfg = tiny_config()
    torch.manual_seed(0)
    fused_net = build_model(cfg.model, (1, 8, 8))
    plain_net = build_model(cfg.model, (1, 8, 8))
    plain_net.load_state_dict(fused_net.state_dict())
    initial = {k: v.clone() for k, v in plain_net.state_dict().items()}
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}
    fused = adamw(fused_net.parameters(), torch.device("cpu"), **kw)
    plain = torch.optim.AdamW(plain_net.parameters(), **kw)  # torch's CPU default: a loop
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 0])
    for step in range(3):
        if step == 2:  # resume the fused one from the default one's state, as a checkpoint can
            load_adamw_state(fused, plain.state_dict())
            fused_net.load_state_dict(plain_net.state_dict())
            assert all(group["fused"] is True for group in fused.param_groups)
        for net, opt in ((fused_net, fused), (plain_net, plain)):
            opt.zero_grad()
            net(x, t, y).square().mean().backward()
            opt.step()
    moved = 0
    for (name, a), b in zip(fused_net.named_parameters(), plain_net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(a, initial[name])
    assert moved > len(initial) // 2  # the steps did train (some tensors get no gradient)


# --------------------------------------------------------------------------- checkpoints
def _save(tmp_path, cfg, net, ema, **state):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1])).square().mean().backward()
    opt.step()
    return save_checkpoint(
        tmp_path / "ckpt",
        model=net,
        ema=ema.module,
        optimizer=opt,
        state=TrainState(images_seen=64, step=2, data_shape=[1, 8, 8], **state),
        config=cfg,
    )


def test_checkpoint_round_trip_and_inference_uses_ema(tmp_path):
    cfg = tiny_config()
    net = perturbed(build_model(cfg.model, (1, 8, 8)))
    ema = EMA(net, 1000)
    perturbed(net, seed=2)  # raw weights now differ from the EMA
    d = _save(tmp_path, cfg, net, ema, mlflow_run_id="abc", val_loss=0.5, manifest_hash="h")
    assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "model.pt", "state.json"]
    state = read_state(d)
    assert (state.images_seen, state.step, state.mlflow_run_id, state.val_loss) == (
        64,
        2,
        "abc",
        0.5,
    )
    loaded = load_checkpoint(d)
    assert loaded.config == cfg
    assert loaded.optimizer is not None and loaded.optimizer["state"]
    assert "torch" in loaded.rng[0]
    model, config = load_for_inference(d)
    assert config == cfg and not model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ema.state_dict()[k])
    raw, _ = load_for_inference(d, use_ema=False)
    for k, v in raw.state_dict().items():
        torch.testing.assert_close(v, net.state_dict()[k])


def test_checkpoint_that_does_not_fit_names_checkpoint_and_keys(tmp_path):
    cfg = tiny_config()
    net = build_model(cfg.model, (1, 8, 8))
    d = _save(tmp_path, cfg, net, EMA(net, 1000))
    other = build_model(tiny_config(base_channels=16).model, (1, 8, 8))
    with pytest.raises(ValueError, match=r"ckpt.*shape mismatch: .*conv"):
        load_state_into(other, load_checkpoint(d).model, str(d))
    unconditional = build_model(tiny_config(num_classes=0).model, (1, 8, 8))
    with pytest.raises(CheckpointError, match=r"unexpected keys: class_embed"):
        load_state_into(unconditional, load_checkpoint(d).model, str(d))


def test_checkpoint_loading_is_weights_only(tmp_path):
    cfg = tiny_config()
    net = build_model(cfg.model, (1, 8, 8))
    d = _save(tmp_path, cfg, net, EMA(net, 1000))
    # a pickle that would call a function on load is refused, and named
    torch.save({"format": "fmpipe-checkpoint/1", "model": {}, "x": math.hypot}, d / "model.pt")
    with pytest.raises(CheckpointError, match=r"weights only"):
        load_checkpoint(d)
    (d / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing state.json"):
        load_checkpoint(d)


# --------------------------------------------------------------------------- batches
def test_micro_batch_must_divide_the_global_batch():
    assert micro_batch_size(128, 2, 4) == 16
    with pytest.raises(ValueError, match=r"batch_size=100 .* divisible by .* 3 \* 1"):
        micro_batch_size(100, 3, 1)


def test_in_memory_source_splits_one_global_batch_across_ranks():
    x = torch.randn(20, 1, 4, 4)
    src = InMemorySource(x, torch.arange(20) % 3, seed=5)

    def rank_batches(rank, world, accum, start=0, n=6):
        ctx = SourceContext(rank, world, 8 // (world * accum), accum, 8, start, 0)
        it = src.batches(ctx)
        return [next(it) for _ in range(n)]

    one = rank_batches(0, 1, 1, n=3)
    # 2 ranks x 2 micro-batches: step s is [micro 0: rank 0, rank 1][micro 1: rank 0, rank 1]
    r0, r1 = rank_batches(0, 2, 2), rank_batches(1, 2, 2)
    for step in range(3):
        parts = [r0[2 * step], r1[2 * step], r0[2 * step + 1], r1[2 * step + 1]]
        joined = torch.cat([p["x_0"] for p in parts])
        torch.testing.assert_close(joined, one[step]["x_0"])
    # resuming at a later step gives the same batches as running through
    later = rank_batches(0, 1, 1, start=16, n=1)[0]
    torch.testing.assert_close(later["x_1"], one[2]["x_1"])


# --------------------------------------------------------------------------- validation
def test_validation_loss_is_deterministic_and_zero_model_scores_the_second_moment():
    gen = torch.Generator().manual_seed(0)
    x_1 = torch.rand(40, 1, 8, 8, generator=gen) * 2 - 1
    val = ValSet(x_1, torch.randn(40, 1, 8, 8, generator=gen), torch.rand(40, generator=gen),
                 torch.arange(40) % 3, [str(i) for i in range(40)])  # fmt: skip
    cfg = tiny_config()
    net = build_model(cfg.model, (1, 8, 8))  # zero output conv: predicts v = 0
    zero = validation_loss(net, val, batch_size=16)
    assert zero == pytest.approx(float((val.x_1 - val.x_0).double().square().mean()), rel=1e-6)
    assert constant_predictor_loss(val) < zero
    perturbed(net)
    first = validation_loss(net, val, batch_size=16)
    assert validation_loss(net, val, batch_size=16) == first
    assert net.training  # mode restored


def test_a_students_validation_loss_is_its_landing_distance_at_its_grid_times():
    """train.objective=distill: val_loss is the student's own objective on the held-out
    pairs. For K = 1 and l2 every row sits at s = 0, where the landing distance is the CFM
    loss at t = 0; for K = 2 the rows with t >= 1/2 sit at s = 1/2, weighted (1 - s)^2."""
    from pipeline.train.objective import Objective

    gen = torch.Generator().manual_seed(1)
    x_1 = torch.rand(40, 1, 8, 8, generator=gen) * 2 - 1
    val = ValSet(x_1, torch.randn(40, 1, 8, 8, generator=gen), torch.rand(40, generator=gen),
                 torch.arange(40) % 3, [str(i) for i in range(40)])  # fmt: skip
    net = perturbed(build_model(tiny_config().model, (1, 8, 8)))

    def at(t: torch.Tensor, rows: torch.Tensor | None = None) -> ValSet:
        """``val`` with times ``t``, restricted to ``rows`` (a mask) if given."""
        rows = torch.ones(len(val), dtype=torch.bool) if rows is None else rows
        return ValSet(val.x_1[rows], val.x_0[rows], t[rows], val.label[rows], [])

    one_step = validation_loss(net, val, objective=Objective("distill", 1, "l2", "pair_path"),
                               batch_size=16)  # fmt: skip
    # equal up to float32 rounding: x_0 + v - x_1 against v - (x_1 - x_0)
    assert one_step == pytest.approx(validation_loss(net, at(torch.zeros(40))), rel=1e-5)
    assert one_step != pytest.approx(validation_loss(net, val), rel=1e-3)  # not CFM at t

    late = val.t >= 0.5  # K = 2: these rows at s = 1/2, the others at s = 0
    grid = torch.where(late, 0.5, 0.0)
    early_sum = validation_loss(net, at(grid, ~late)) * int((~late).sum())
    late_sum = 0.25 * validation_loss(net, at(grid, late)) * int(late.sum())
    two_step = validation_loss(net, val, objective=Objective("distill", 2, "l2", "pair_path"),
                               batch_size=16)  # fmt: skip
    assert 0 < late.sum() < 40
    assert two_step == pytest.approx((early_sum + late_sum) / 40, rel=1e-5)
    # rollout: the same at s = 0 (no jump before it); the late rows from the first jump
    rollout = Objective("distill", 2, "l2", "rollout")
    assert validation_loss(net, val, objective=Objective("distill", 1, "l2", "rollout"),
                           batch_size=16) == pytest.approx(one_step, rel=1e-5)  # fmt: skip
    assert validation_loss(net, val, objective=rollout, batch_size=16) != pytest.approx(
        two_step, rel=1e-3
    )


def test_sample_grid_has_one_row_per_class_and_fixed_noise():
    cfg = tiny_config()
    net = perturbed(build_model(cfg.model, (1, 8, 8)))
    images, nrow = sample_grid(net, (1, 8, 8), seed=3, steps=2, columns=4)
    assert images.shape == (3 * 4, 1, 8, 8) and nrow == 4
    again, _ = sample_grid(net, (1, 8, 8), seed=3, steps=2, columns=4)
    torch.testing.assert_close(images, again)


# --------------------------------------------------------------------------- the job
def test_train_job_is_listed_and_maps_flags_onto_config(capsys):
    from jobs import cli
    from jobs import train as job

    assert "train" in cli.JOBS
    argv = ["--data", "s3://b/d", "--run-name", "r1", "--storage", "/tmp/x", "--workers", "2",
            "--gpus-per-worker", "1", "--print-config", "train.lr=0.01"]  # fmt: skip
    assert job.main(argv) == 0
    cfg = build_config(__import__("yaml").safe_load(capsys.readouterr().out))
    assert (cfg.data.uri, cfg.train.run_name, cfg.train.storage_path) == (
        "s3://b/d",
        "r1",
        "/tmp/x",
    )
    assert (cfg.train.num_workers, cfg.train.use_gpu, cfg.train.lr) == (2, True, 0.01)
    # no name and no class count in the job config: the dataset's (the last folder of
    # --data; its class count once train() reads it, stream.adopt_dataset_shape)
    assert cfg.train.registered_model_name == "d"
    from jobs._common import packaged_defaults

    assert "num_classes" not in build_config(packaged_defaults("train")).model.model_fields_set
    assert job.main(["train.nope=1"]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err


def test_train_fails_before_any_worker_on_bad_data_or_batch(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.stream import DatasetError
    from pipeline.train.trainer import train

    missing = build_config({"data": {"uri": str(tmp_path / "nothing")}})
    with pytest.raises(DatasetError, match=r"nothing' does not exist"):
        train(missing, print_fn=None)
    uneven = build_config({"data": {"uri": "x", "batch_size": 10}, "train": {"num_workers": 4}})
    with pytest.raises(ValueError, match=r"batch_size=10 .* divisible"):
        train(uneven, print_fn=None)
    data = tmp_path / "digits"
    prepare_dataset(build_config({"prepare": {"out": str(data), "resolution": 8}}), log=None)
    wrong = build_config({"data": {"uri": str(data), "resolution": 8}, "model": {"num_classes": 7}})
    with pytest.raises(ConfigError, match=r"num_classes=7 .* 10 classes"):
        train(wrong, print_fn=None)


def test_build_parts_starts_from_init_weights_and_a_checkpoint_of_the_run_wins(tmp_path):
    """InitWeights (retrain's start from the champion) are a fresh run's weights exactly; a
    complete checkpoint of the run, when there is one, is restored instead."""
    from pipeline.checkpoint import TrainState, save_checkpoint
    from pipeline.models import build_model
    from pipeline.storage import resolve
    from pipeline.train.dist import WorkerGroup
    from pipeline.train.resume import find_resume_point
    from pipeline.train.setup import build_parts
    from pipeline.train.spec import InitWeights, RunContext

    cfg = build_config({"data": {"resolution": 8, "channels": 1}, "model": TINY_UNET})
    group = WorkerGroup(torch.device("cpu"), rank=0, world_size=1)
    torch.manual_seed(7)
    champion = build_model(cfg.model, (1, 8, 8))  # other weights than the seeded init
    init = InitWeights("test:champion", model=champion.state_dict(), ema=None)

    fresh = build_parts(cfg, RunContext(data_shape=(1, 8, 8), init=init), group)
    assert not fresh.resumed and fresh.state.images_seen == 0
    for key, tensor in init.model.items():
        assert torch.equal(fresh.net.state_dict()[key], tensor), key
        assert torch.equal(fresh.ema.module.state_dict()[key], tensor), key  # EMA = model
    seeded = build_parts(cfg, RunContext(data_shape=(1, 8, 8)), group)
    assert any(
        not torch.equal(seeded.net.state_dict()[k], v) for k, v in init.model.items()
    )  # the init weights really are other weights

    run_dir = tmp_path / "runs" / "r"
    torch.manual_seed(8)
    trained = build_model(cfg.model, (1, 8, 8))
    state = TrainState(images_seen=16, step=2, data_epoch=1, data_shape=[1, 8, 8])
    save_checkpoint(run_dir / "checkpoint_000000000016", model=trained, state=state, config=cfg)
    point = find_resume_point(resolve(str(run_dir)))
    assert point is not None and point.images_seen == 16
    resumed = build_parts(cfg, RunContext(data_shape=(1, 8, 8), resume=point, init=init), group)
    assert resumed.resumed and resumed.state.images_seen == 16 and resumed.state.data_epoch == 1
    for key, tensor in trained.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[key], tensor), key


def test_an_incomplete_checkpoint_is_skipped_for_the_newest_complete_one(tmp_path):
    """What an interrupted upload leaves (state.json, but a short or missing model.pt) is
    never resumed from; the newest complete checkpoint is."""
    from pipeline.checkpoint import TrainState, save_checkpoint
    from pipeline.models import build_model
    from pipeline.storage import resolve
    from pipeline.train.resume import find_resume_point

    cfg = build_config({"data": {"resolution": 8, "channels": 1}, "model": TINY_UNET})
    net = build_model(cfg.model, (1, 8, 8))
    run_dir = tmp_path / "run"
    for images in (16, 24, 32):
        state = TrainState(images_seen=images, data_shape=[1, 8, 8])
        save_checkpoint(run_dir / f"checkpoint_{images:012d}", model=net, state=state, config=cfg)
    short = run_dir / "checkpoint_000000000032" / "model.pt"
    short.write_bytes(short.read_bytes()[:100])
    (run_dir / "checkpoint_000000000024" / "config.yaml").unlink()
    point = find_resume_point(resolve(str(run_dir)))
    assert point is not None and point.name == "checkpoint_000000000016"


def test_ray_trains_checkpoint_list_is_set_aside_only_when_it_would_stop_the_run(tmp_path):
    """Ray Train refuses to start a run whose checkpoint_manager_snapshot.json is empty, half
    written or names a folder that is gone; such a file is moved aside (its bytes kept under
    a new name), a sound one and a missing one are left alone."""
    import json

    from pipeline.storage import resolve
    from pipeline.train.resume import RAY_SNAPSHOT, set_aside_broken_ray_snapshot

    run_dir = tmp_path / "run"
    (run_dir / "checkpoint_000000000016").mkdir(parents=True)
    location = resolve(str(run_dir))
    assert set_aside_broken_ray_snapshot(location) == ""  # none yet: nothing to do

    def snapshot(*names: str) -> bytes:
        results = [{"checkpoint_dir_name": name, "metrics": {}} for name in names]
        return json.dumps({"ray_version": "2.60.0", "checkpoint_results": results}).encode()

    sound = snapshot("checkpoint_000000000016")
    cases = {
        b"": "was empty",
        sound[: len(sound) // 2]: "was unreadable (JSONDecodeError",
        snapshot("checkpoint_000000000016", "checkpoint_000000000032"): (
            "names checkpoint folders that are gone: checkpoint_000000000032"
        ),
    }
    for raw, problem in cases.items():
        for old in run_dir.glob(f"{RAY_SNAPSHOT}*"):
            old.unlink()
        (run_dir / RAY_SNAPSHOT).write_bytes(raw)
        line = set_aside_broken_ray_snapshot(location)
        assert problem in line and str(run_dir / RAY_SNAPSHOT) in line, line
        assert not (run_dir / RAY_SNAPSHOT).exists()
        (kept,) = run_dir.glob(f"{RAY_SNAPSHOT}.broken-*")
        assert kept.read_bytes() == raw and kept.name in line
    (run_dir / RAY_SNAPSHOT).write_bytes(sound)
    assert set_aside_broken_ray_snapshot(location) == ""
    assert (run_dir / RAY_SNAPSHOT).read_bytes() == sound


def test_transient_worker_errors_back_off_and_are_reported(monkeypatch):
    """StopOnDataErrors on the controller: before restart n it waits backoff * 2**(n-1)
    (capped), sends a one-line, scrubbed retry event, and stays quiet once Ray Train gives
    up; a final data error is raised at once instead (never retried)."""
    import pipeline.train.data as data_module
    from pipeline.data.stream import DatasetError
    from pipeline.train.data import StopOnDataErrors

    slept: list[float] = []
    monkeypatch.setattr(data_module.time, "sleep", slept.append)
    monkeypatch.setenv("FMPIPE_TEST_SECRET", "hunter2-very-secret")

    class ListQueue:
        def __init__(self):
            self.events = []

        def put_nowait(self, event):
            self.events.append(event)

    queue = ListQueue()
    callback = StopOnDataErrors(max_failures=3, backoff_s=25.0, queue=queue)
    for _ in range(4):
        callback.after_exception(
            None, {1: OSError("S3 down\nhunter2-very-secret"), 0: OSError("x")}
        )
    assert slept == [25.0, 50.0, 60.0]  # doubled, capped at MAX_BACKOFF_S; none after giving up
    assert [e["attempt"] for e in queue.events] == [2, 3, 4]
    assert {e["attempts"] for e in queue.events} == {4} and {e["rank"] for e in queue.events} == {0}
    assert queue.events[0]["error"] == "OSError: x"
    one = StopOnDataErrors(max_failures=1, queue=queue)
    one.after_exception(None, {0: OSError("S3 down\nhunter2-very-secret")})
    assert queue.events[-1]["error"] == "OSError: S3 down"
    bad = DatasetError("shard-000001.tar: sha256 mismatch")
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        StopOnDataErrors(max_failures=3, queue=queue).after_exception(None, {0: bad})
    assert len(queue.events) == 4  # the final error sent no retry line


def test_the_distillation_objective_trains_on_the_k_step_grid_with_its_landing_loss():
    """train.objective=distill: the step's loss is the landing loss at the row's t rounded
    down to the k-step grid, computed on the weights before the step, from the pair path or
    (distill_states=rollout) from the student's own first jump; cfm is the plain loss.
    Distillation without data.pairs is refused before any worker."""
    import copy

    from pipeline.flow import CondOTPath, cfm_loss_per_sample
    from pipeline.flow.distill import distill_loss_per_sample, grid_times
    from pipeline.train.dist import WorkerGroup
    from pipeline.train.setup import build_parts
    from pipeline.train.spec import RunContext
    from pipeline.train.step import CFMStep
    from pipeline.train.trainer import train

    gen = torch.Generator().manual_seed(0)
    batch = {
        "x_1": torch.randn(8, 1, 8, 8, generator=gen),
        "x_0": torch.randn(8, 1, 8, 8, generator=gen),
        "t": torch.rand(8, generator=gen),
        "label": torch.full((8,), -1, dtype=torch.long),
    }
    group = WorkerGroup(torch.device("cpu"), rank=0, world_size=1)
    for objective, states in (("cfm", "pair_path"), ("distill", "pair_path"),
                              ("distill", "rollout"), ("distill", "unrolled")):  # fmt: skip
        cfg = build_config(
            {"data": {"resolution": 8, "channels": 1, "batch_size": 8}, "model": TINY_UNET,
             "train": {"objective": objective, "distill_steps": 2, "distill_loss": "l2",
                       "distill_states": states, "total_images": 8}}
        )  # fmt: skip
        parts = build_parts(cfg, RunContext(data_shape=(1, 8, 8)), group)
        before = copy.deepcopy(parts.model).eval()
        outcome, _ = CFMStep(cfg, parts, group, 8)(iter([batch]))
        x_0, x_1 = batch["x_0"], batch["x_1"]
        t = grid_times(batch["t"], 2) if objective == "distill" else batch["t"]
        if states == "unrolled":  # every row at the last grid time, after its first jump
            t = torch.full((8,), 0.5)
        x_t = CondOTPath().sample(x_0=x_0, x_1=x_1, t=t).x_t
        with torch.no_grad():
            if states != "pair_path":  # rows at s = 1/2 start where the first jump landed
                first = x_0 + 0.5 * before(x_0, torch.zeros(8), None)
                x_t = torch.where((t == 0.5)[:, None, None, None], first, x_0)
            v = before(x_t, t, None)
        if objective == "distill":
            expected = distill_loss_per_sample(v, x_t, x_1, t, "l2").sum()
        else:
            expected = cfm_loss_per_sample(v, x_0, x_1).sum()
        assert float(outcome.loss_sum) == pytest.approx(float(expected), rel=1e-4), states
        if states == "rollout":
            assert 0 < int((t == 0.5).sum()) < 8  # both grid times were in the batch
    with pytest.raises(ConfigError, match=r"train\.objective=distill .* set data\.pairs"):
        train(build_config({"train": {"objective": "distill"}}), print_fn=None, track=False)


def test_a_run_is_not_resumed_on_other_data(tmp_path, monkeypatch):
    """The job defaults give every run one name (`digits`): a re-run on another dataset (or
    other pairs) must not continue that run's checkpoint; the same data, however it is
    written (empty = the default dataset, a trailing slash), does."""
    from tiny import TINY_UNET, tiny_checkpoint

    from pipeline.config import ConfigError, build_config
    from pipeline.home import store_uri
    from pipeline.storage import resolve
    from pipeline.train.resume import check_resumable, find_resume_point

    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    tiny_checkpoint(tmp_path / "run" / "checkpoint_000000000064")  # data.uri empty: digits
    point = find_resume_point(resolve(str(tmp_path / "run")))
    assert point is not None

    def cfg(**data):
        tree = {"data": {"resolution": 8, "channels": 1, **data},
                "model": {**TINY_UNET, "num_classes": 3}}  # fmt: skip
        return build_config(tree)

    check_resumable(cfg(), point)
    check_resumable(cfg(uri=store_uri("digits") + "/"), point)  # the same dataset, spelled out
    with pytest.raises(ConfigError, match=r"data\.uri='s3://b/cats' \(the run has '.*digits'\)"):
        check_resumable(cfg(uri="s3://b/cats"), point)
    with pytest.raises(ConfigError, match=r"data\.pairs='s3://b/pairs' \(the run has ''\)"):
        check_resumable(cfg(pairs="s3://b/pairs"), point)
    # nor under another objective: a finished run would be registered as trained on it
    student = cfg()
    student.train.objective = "distill"
    with pytest.raises(ConfigError, match=r"train\.objective='distill' \(the run has 'cfm'\)"):
        check_resumable(student, point)
    changed = cfg()
    changed.train.distill_states = "rollout"  # not a student: its distill_* do not count
    check_resumable(changed, point)
    # a student saved before train.distill_states existed was a pair-path one
    import yaml

    saved = tmp_path / "run" / "checkpoint_000000000064" / "config.yaml"
    tree = yaml.safe_load(saved.read_text())
    tree["train"]["objective"] = "distill"
    del tree["train"]["distill_states"]
    saved.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"distill_states='unrolled' \(the run has 'pair_path'\)"):
        check_resumable(student, point)
    student.train.distill_states = "pair_path"
    check_resumable(student, point)
