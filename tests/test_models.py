"""Tests for pipeline.models: shapes, conditioning, CFG, determinism, init, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models import (
    MLPVelocity,
    UNet,
    bare_module,
    build_model,
    count_parameters,
    guided_velocity,
)

torch.set_num_threads(2)


def tiny_unet(in_channels: int = 1, resolution: int = 8, num_classes: int = 0, **kw) -> UNet:
    args = dict(
        base_channels=16,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[resolution // 2],
        num_heads=2,
        dropout=0.0,
        norm_groups=8,
    )
    args.update(kw)
    return UNet(in_channels, resolution, num_classes=num_classes, **args)


def perturb(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Move every parameter off its init (zero-initialised layers would hide conditioning)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def inputs(shape: tuple[int, ...], batch: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=gen), torch.rand(batch, generator=gen)


# --- shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 7])
@pytest.mark.parametrize("num_classes", [0, 4])
def test_mlp_shapes(dim: int, num_classes: int) -> None:
    model = MLPVelocity(dim, hidden_dim=32, depth=2, num_classes=num_classes)
    x, t = inputs((dim,))
    label = torch.tensor([0, 1, 2]) if num_classes else None
    assert model(x, t, label).shape == (3, dim)
    assert model(x, 0.5).shape == (3, dim)  # scalar t broadcast


@pytest.mark.parametrize(
    ("channels", "resolution", "mult"),
    [(1, 8, [1, 2]), (3, 16, [1, 2, 2]), (2, 4, [1]), (4, 16, [1, 1, 2])],
)
@pytest.mark.parametrize("num_classes", [0, 5])
def test_unet_shapes(channels: int, resolution: int, mult: list[int], num_classes: int) -> None:
    model = tiny_unet(
        channels, resolution, num_classes, channel_mult=mult, attention_resolutions=[4]
    )
    x, t = inputs((channels, resolution, resolution), batch=2)
    label = torch.tensor([0, num_classes]) if num_classes else None
    assert model(x, t, label).shape == x.shape
    assert model(x, torch.tensor(0.3)).shape == x.shape


def test_build_model_default_configs() -> None:
    unet = build_model(ModelConfig(), (1, 16, 16))
    assert isinstance(unet, UNet)
    x, t = inputs((1, 16, 16), batch=2)
    assert unet(x, t).shape == x.shape
    mlp = build_model(ModelConfig(kind="mlp", hidden_dim=32, depth=2, num_classes=3), (2,))
    assert isinstance(mlp, MLPVelocity)
    assert mlp(torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 3])).shape == (4, 2)


# --- conditioning -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_labels_change_output_and_null_class(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "mlp":
        model, shape = MLPVelocity(3, 32, 2, num_classes=4), (3,)
    else:
        model, shape = tiny_unet(num_classes=4), (1, 8, 8)
    perturb(model).eval()
    x, t = inputs(shape, batch=2)
    out0 = model(x, t, torch.tensor([0, 0]))
    out1 = model(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(out0, out1)
    assert torch.equal(model(x, t, None), model(x, t, torch.tensor([4, 4])))


@pytest.mark.parametrize("kind", ["mlp", "unet"])
@pytest.mark.parametrize("bad", [-1, 5, 100])
def test_out_of_range_label_raises(kind: str, bad: int) -> None:
    if kind == "mlp":
        model, shape = MLPVelocity(3, 16, 1, num_classes=4), (3,)
    else:
        model, shape = tiny_unet(num_classes=4), (1, 8, 8)
    x, t = inputs(shape, batch=2)
    with pytest.raises(ValueError, match=str(bad)):
        model(x, t, torch.tensor([0, bad]))


def test_label_errors() -> None:
    x, t = inputs((1, 8, 8), batch=2)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_unet()(x, t, torch.tensor([0, 1]))
    cond = tiny_unet(num_classes=3)
    with pytest.raises(ValueError, match="integer"):
        cond(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        cond(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="x_t"):
        cond(torch.randn(2, 3, 8, 8), t)


# --- classifier-free guidance -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_guided_velocity(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "mlp":
        model, shape = MLPVelocity(3, 32, 2, num_classes=4), (3,)
    else:
        model, shape = tiny_unet(num_classes=4), (1, 8, 8)
    perturb(model).eval()
    x, t = inputs(shape)
    label = torch.tensor([0, 2, 3])
    v_cond = model(x, t, label)
    v_uncond = model(x, t, None)
    assert torch.equal(guided_velocity(model, x, t, label, 1.0), v_cond)
    assert torch.equal(guided_velocity(model, x, t, None, 3.0), v_uncond)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided_velocity(model, x, t, label, 0.0), v_uncond, **close)
    for w in (0.5, 2.0, 4.5):
        expected = v_uncond + w * (v_cond - v_uncond)
        torch.testing.assert_close(guided_velocity(model, x, t, label, w), expected, **close)
    # a scalar time works through the batched path too
    torch.testing.assert_close(
        guided_velocity(model, x, 0.25, label, 2.0),
        guided_velocity(model, x, torch.full((3,), 0.25), label, 2.0),
    )


def test_guided_velocity_needs_conditional_model() -> None:
    x, t = inputs((1, 8, 8), batch=2)
    with pytest.raises(ValueError, match="class-conditional"):
        guided_velocity(tiny_unet(), x, t, torch.tensor([0, 1]), 2.0)


# --- determinism and init ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_same_seed_same_model_and_outputs(kind: str) -> None:
    cfg = ModelConfig(
        kind=kind,
        hidden_dim=32,
        depth=2,
        base_channels=16,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[4],
        num_heads=2,
        dropout=0.1,
        num_classes=3,
    )
    shape = (3,) if kind == "mlp" else (1, 8, 8)
    models = []
    for _ in range(2):
        torch.manual_seed(123)
        models.append(build_model(cfg, shape))
    a, b = models
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    perturb(a)
    perturb(b)
    x, t = inputs(shape)
    label = torch.tensor([0, 1, 3])
    a.eval()
    b.eval()
    assert torch.equal(a(x, t, label), b(x, t, label))
    assert torch.equal(a(x, t, label), a(x, t, label))  # eval: dropout off


def test_fresh_unet_outputs_zero() -> None:
    model = tiny_unet(num_classes=3)
    x, t = inputs((1, 8, 8))
    assert torch.count_nonzero(model(x, t, torch.tensor([0, 1, 2]))) == 0


@pytest.mark.parametrize("kind", ["mlp", "unet"])
@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("label_none", [False, True])
def test_gradients_reach_every_parameter(kind: str, num_classes: int, label_none: bool) -> None:
    """DDP without find_unused_parameters needs every parameter in the graph."""
    if kind == "mlp":
        model, shape = MLPVelocity(3, 16, 2, num_classes=num_classes), (3,)
    else:
        model, shape = tiny_unet(num_classes=num_classes, dropout=0.1), (1, 8, 8)
    perturb(model)  # so no gradient is zero merely because of zero-init layers
    x, t = inputs(shape)
    label = None if (label_none or not num_classes) else torch.tensor([0, 1, 2])
    model(x, t, label).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    has_class_embed = any(n.startswith("class_embed") for n, _ in model.named_parameters())
    assert has_class_embed == (num_classes > 0)


def test_count_parameters() -> None:
    model = tiny_unet(num_classes=2)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total > 0
    model.input_conv.weight.requires_grad_(False)
    assert count_parameters(model) == total - model.input_conv.weight.numel()


# --- autocast and compile ---------------------------------------------------------------


def test_bf16_autocast_forward_backward() -> None:
    model = perturb(tiny_unet(num_classes=3))
    x, t = inputs((1, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, torch.tensor([0, 1, 3]))
        loss = out.float().pow(2).mean()
    assert out.dtype == torch.float32 and out.shape == x.shape
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_torch_compile_fullgraph() -> None:
    """Dynamo traces the whole forward without graph breaks (label checks are skipped)."""
    model = perturb(tiny_unet(num_classes=3)).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t = inputs((1, 8, 8))
    label = torch.tensor([0, 1, 3])
    torch.testing.assert_close(compiled(x, t, label), model(x, t, label))
    torch.testing.assert_close(
        guided_velocity(compiled, x, t, label, 2.0), guided_velocity(model, x, t, label, 2.0)
    )


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (dict(resolution=12, channel_mult=[1, 2, 2]), "resolution"),
        (dict(base_channels=12), "norm_groups"),
        (dict(channel_mult=[2, 3], norm_groups=32), "norm_groups"),
        (dict(attention_resolutions=[3]), "attention_resolutions"),
        (dict(num_heads=3), "num_heads"),
        (dict(channel_mult=[]), "channel_mult"),
        (dict(channel_mult=[1, 0]), "channel_mult"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_classes=-1), "num_classes"),
        (dict(in_channels=0), "in_channels"),
        (dict(base_channels=0), "base_channels"),
        (dict(norm_groups=0), "norm_groups"),
    ],
)
def test_unet_constructor_errors(overrides: dict, name: str) -> None:
    args = dict(
        in_channels=1,
        resolution=8,
        base_channels=16,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[4],
        num_heads=2,
        dropout=0.0,
        norm_groups=8,
        num_classes=0,
    )
    args.update(overrides)
    with pytest.raises(ValueError, match=name):
        UNet(**args)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((0, 8, 1), "dim"),
        ((2, 0, 1), "hidden_dim"),
        ((2, 8, 0), "depth"),
        ((2, 8, 1, -1), "num_classes"),
    ],
)
def test_mlp_constructor_errors(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MLPVelocity(*args)


@pytest.mark.parametrize(
    ("kind", "shape", "match"),
    [
        ("mlp", (1, 8, 8), "mlp"),
        ("unet", (2,), "unet"),
        ("unet", (1, 8, 16), "H == W"),
        ("unet", (1, 8), "unet"),
        ("mlp", (0,), "data_shape"),
    ],
)
def test_build_model_shape_errors(kind: str, shape: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(ModelConfig(kind=kind), shape)


def test_build_model_default_attention_needs_matching_size() -> None:
    with pytest.raises(ValueError, match="attention_resolutions"):
        build_model(ModelConfig(), (1, 28, 28))  # sizes 28, 14, 7: no 8


def test_mlp_bf16_autocast_returns_input_dtype() -> None:
    model = MLPVelocity(3, 16, 2, num_classes=2)
    x, t = inputs((3,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, torch.tensor([0, 1, 2]))
    assert out.dtype == torch.float32
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bare_module_unwraps_ddp_and_compile() -> None:
    """One unwrapping rule (pipeline.models) for guidance, checkpoints and EMA."""
    import torch.distributed as dist

    from pipeline import checkpoint

    assert checkpoint.bare_module is bare_module  # checkpoint re-exports the one rule
    net = build_model(ModelConfig(kind="mlp", hidden_dim=8, depth=1, num_classes=3), (2,))
    assert bare_module(net) is net
    compiled = torch.compile(net)  # not called: no compilation happens
    assert bare_module(compiled) is net
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = torch.compile(nn.parallel.DistributedDataParallel(net))
        assert bare_module(wrapped) is net
        x, t, label = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 0])
        # guidance reads num_classes through the wrappers
        v = guided_velocity(nn.parallel.DistributedDataParallel(net), x, t, label, 2.0)
        assert v.shape == (4, 2)
    finally:
        dist.destroy_process_group()
