"""The typed configuration: the one source of truth for every setting.

A config is a YAML file (optional) plus ``a.b=value`` overrides applied on top of the
defaults below. Unknown keys and invalid values raise :class:`ConfigError` before any work
starts; the message names the key and says what is allowed. The resolved config is what
MLflow logs and what a checkpoint carries, so credentials never live here: object storage
credentials come only from the standard AWS chain (environment, profile, instance role).

Durations and intervals are counted in images seen, not steps or epochs, so a config means
the same run on 1 worker or 64 (the global batch is fixed; workers split it).
"""

from __future__ import annotations

import copy
import importlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid. The message names the key."""


def _implemented(what: str, module: str, names: str) -> AfterValidator:
    """A validator accepting only the names ``module.names`` implements (imported on use).

    The allowed values of a setting come from the code that implements them (the solver
    table in :mod:`pipeline.flow.solvers`, the model builders, ...), never from a copy of
    their names here. The import is deferred so that ``--help`` and config parsing stay
    free of torch until a value is checked.
    """

    def check(value: str) -> str:
        allowed = tuple(getattr(importlib.import_module(module), names))
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of the {what}: {', '.join(allowed)}")
        return value

    return AfterValidator(check)


SolverName = Annotated[str, _implemented("ODE solvers", "pipeline.flow.solver_specs", "SOLVERS")]
CouplingName = Annotated[str, _implemented("couplings", "pipeline.data.coupling", "COUPLINGS")]
NoiseDtype = Annotated[str, _implemented("noise dtypes", "pipeline.data.coupling", "NOISE_DTYPES")]
DistillLoss = Annotated[
    str, _implemented("distillation losses", "pipeline.flow.distill", "DISTILL_LOSSES")
]
DistillStates = Annotated[
    str, _implemented("distillation states", "pipeline.flow.distill", "DISTILL_STATES")
]
TimeSamplerName = Annotated[
    str, _implemented("time samplers", "pipeline.flow.time_samplers", "TIME_SAMPLERS")
]
ModelKind = Annotated[str, _implemented("model kinds", "pipeline.models", "MODEL_KINDS")]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class PrepareConfig(Section):
    """`fmpipe prepare`: turn an image source into WebDataset shards + _manifest.json."""

    source: str = "digits"  # digits | folder:PATH | synthetic:shapes | webdataset:ADDRESS
    out: str = ""  # dataset root (s3://bucket/prefix or a path); empty: $FMPIPE_HOME/store/<name>
    resolution: int = Field(16, ge=2, le=1024)  # stored image size (square)
    channels: Literal[1, 3] = 1  # stored as L (1) or RGB (3); webdataset: unset, the images'
    shard_size: int = Field(1000, ge=1)  # samples per shard
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # held out into the val split
    num_samples: int = Field(10_000, ge=1)  # synthetic sources only
    image_format: Literal["png", "jpg"] = "png"
    parallel_threshold: int = Field(5_000, ge=1)  # more samples than this: one Ray task/shard


def _address_text(value: Any) -> Any:
    """A dataset address given as a YAML list -> one comma-separated string."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(item, str) for item in value):
            raise ValueError("a dataset address list holds strings (URIs, paths, patterns)")
        return ",".join(item.strip() for item in value if item.strip())
    return value


AddressText = Annotated[str, BeforeValidator(_address_text)]  # str, or a YAML list of them


class DataConfig(Section):
    uri: AddressText = ""  # dataset root written by `fmpipe prepare`, or an address to index
    # A coupled sample set (`fmpipe sample --pairs`) to train on instead of data.uri: reflow's
    # fixed (x_0, x_1) pairs, no noise drawn (pipeline/data/pairs.py)
    pairs: str = ""
    # Left unset, training takes both from the dataset (stream.adopt_dataset_shape)
    resolution: int = Field(16, ge=2, le=1024)  # images are sized to this (data.resize)
    channels: Literal[1, 3] = 1  # images are converted to L (1) or RGB (3)
    hflip: bool = False  # random horizontal flip; off by default because it ruins digits
    batch_size: int = Field(128, ge=1)  # global batch, split evenly across workers
    coupling: CouplingName = "independent"  # x_0 <-> x_1 pairing in a batch
    ot_per_class: bool = False  # with coupling=ot and labels: assign within each class only
    noise_dtype: NoiseDtype = "float32"  # storage dtype of x_0
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)  # stop when more samples are bad
    shuffle_shards: bool = True  # shard order shuffled per epoch from the seed
    read_parallelism: int = Field(-1, ge=-1)  # Ray Data read tasks; -1 lets Ray decide
    # datasets fmpipe did not write (issue 14)
    index_uri: str = ""  # where `fmpipe index` keeps the index; empty: $FMPIPE_HOME/indexes/
    val_uri: AddressText = ""  # val shards of a foreign dataset (address); empty: val_fraction
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # whole shards carved out as val by seed
    label_source: Literal["auto", "cls", "json", "txt", "none"] = "auto"  # where labels are
    label_field: str = Field("label", pattern=r"^[^.]+(\.[^.]+)*$")  # dotted .json path
    index_bad_examples: int = Field(20, ge=0)  # bad members listed per shard (all counted)
    prefetch_batches: int = Field(2, ge=0)  # batches prefetched by iter_torch_batches
    # decoding of foreign images (issue 14)
    resize: Literal["center_crop", "random_crop", "pad"] = "center_crop"  # to R x R: see decode
    alpha_background: Literal["black", "white"] = "black"  # alpha and pad fill colour
    max_pixels: int = Field(64 * 1024 * 1024, ge=1, le=128 * 1024 * 1024)  # more: bomb, bad


class ModelConfig(Section):
    kind: ModelKind = "unet"
    hidden_dim: int = Field(256, ge=1)  # mlp width
    depth: int = Field(4, ge=1)  # mlp hidden layers
    base_channels: int = Field(32, ge=1)  # unet channels at full resolution
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2])  # one per level
    num_res_blocks: int = Field(2, ge=1)  # residual blocks per level
    attention_resolutions: list[int] = Field(default_factory=lambda: [8])  # sizes with attn
    num_heads: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm_groups: int = Field(8, ge=1)
    # 0: unconditional; else + a null class for CFG. Left unset, training takes the dataset's
    # class count (stream.adopt_dataset_shape; 0 on unlabelled data)
    num_classes: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_mult(self) -> ModelConfig:
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError("channel_mult must be a non-empty list of positive integers")
        return self


class FlowConfig(Section):
    time_sampler: TimeSamplerName = "uniform"
    logit_normal_mean: float = 0.0  # t = sigmoid(mean + std * z), z ~ N(0, 1)
    logit_normal_std: float = Field(1.0, gt=0.0)


class TrainConfig(Section):
    run_name: str = "fmpipe"  # same name + storage_path continues the run (resume)
    storage_path: str = ""  # checkpoints (s3:// or a path); empty: $FMPIPE_HOME/runs
    total_images: int = Field(200_000, ge=1)  # training duration in images seen
    lr: float = Field(2e-4, gt=0.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    warmup_images: int = Field(10_000, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0.0)  # max global grad norm; 0 disables
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step (global batch fixed)
    ema_halflife_images: int = Field(50_000, ge=1)  # EMA decay per step from images/step
    ema_warmup_ratio: float = Field(0.05, ge=0.0)  # halflife <= ratio * images_seen early on
    label_dropout: float = Field(0.1, ge=0.0, le=1.0)  # null-class rate for CFG training
    # What the step minimises: cfm (the flow-matching loss), or distill: a student whose
    # distill_steps Euler steps land on the coupled x_1 (needs data.pairs; flow/distill.py)
    objective: Literal["cfm", "distill"] = "cfm"
    distill_steps: int = Field(1, ge=1, le=16)  # k of a k-step student
    distill_loss: DistillLoss = "pseudo_huber"  # l2 | pseudo_huber (no network to download)
    # where a student's jumps start in training: pair_path (on the straight pair path),
    # rollout (its own Euler states from x_0: what its sampler meets) or unrolled (the whole
    # K-step sampler, gradient through every jump: its final miss, K passes per image; the
    # best measured on the digits, docs/benchmarks.md; flow/distill.py)
    distill_states: DistillStates = "unrolled"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the network
    num_workers: int = Field(1, ge=1)  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)  # fractional keeps CPUs for Ray Data
    torch_threads: int = Field(0, ge=0)  # torch threads per worker; 0: cores it may use
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(2, ge=0)  # worker restarts through FailureConfig
    retry_backoff_s: float = Field(2.0, ge=0.0)  # wait before restart n: this * 2**(n-1), <= 60 s
    checkpoint_every_images: int = Field(50_000, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every_steps: int = Field(20, ge=1)
    val_every_images: int = Field(50_000, ge=1)
    val_max_images: int = Field(512, ge=1)
    val_batch_size: int = Field(256, ge=1)  # rows per forward pass of the validation loss
    grid_every_images: int = Field(100_000, ge=1)
    grid_steps: int = Field(32, ge=1)  # euler steps for the sample grid
    # Sample quality of the EMA weights every this many images (0: never): eval.num_samples
    # samples at eval.seed scored by eval.network against the stored reference; the last
    # figures are tagged on the registered version (pipeline.eval.probe).
    eval_every_images: int = Field(0, ge=0)
    # MLflow registry name; empty: the jobs name it after the dataset (default_names),
    # a library train() registers nothing; "none": never register
    registered_model_name: str = ""
    alias: str = ""  # registry alias pointed at the version this run registers; empty: none

    @model_validator(mode="after")
    def _check_alias(self) -> TrainConfig:
        if self.alias and self.registered_model_name.strip().lower() == "none":
            raise ValueError(
                f"train.alias={self.alias!r} needs a registered model, but "
                "train.registered_model_name=none registers nothing"
            )
        return self


class SampleConfig(Section):
    model: str = ""  # models:/<name>@<alias>, models:/<name>/<version>, or checkpoint URI
    out: str = ""  # output root for sample shards (s3:// or a path)
    num_samples: int = Field(1000, ge=1)
    solver: SolverName = "euler"
    steps: int = Field(32, ge=1)  # fixed-step solvers
    atol: float = Field(1e-5, gt=0.0)  # dopri5
    rtol: float = Field(1e-5, gt=0.0)  # dopri5
    seed: int = 0  # noise of sample i comes from (seed, i) alone
    batch_size: int = Field(256, ge=1)
    shard_size: int = Field(1000, ge=1)  # samples per output shard (fixed index ranges)
    num_actors: int = Field(1, ge=1)
    use_gpu: bool = False
    # Network arithmetic: fp32 (default, bit-identical everywhere) or bf16 autocast (several
    # times faster on tensor-core GPUs; still identical across batch sizes and restarts on
    # one kind of device, since blocks are fixed). The ODE state stays float32 either way.
    precision: Literal["fp32", "bf16"] = "fp32"
    guidance_scale: float = 1.0  # classifier-free guidance w (1: plain conditional)
    label: int | None = None  # class of every sample; None: cycle classes (or unconditional)
    use_ema: bool = True
    # A coupled set for reflow (pipeline/data/pairs.py): beside each PNG the generated x_1 at
    # float32 (<key>.x1.npy, before the 8-bit rounding); x_0 is not stored, a reader
    # regenerates it bit for bit from (seed, index).
    pairs: bool = False


class RetrainConfig(Section):
    """`fmpipe retrain`: continue from the champion on new data, promote only if better."""

    # What decides promotion (lower is better): val_loss (the trainer's validation loss on
    # fixed draws), fd_classifier (Fréchet distance in the dataset classifier's features) or
    # fid (Inception), both from eval.num_samples samples at eval.seed with eval.solver /
    # eval.steps for candidate and champion alike, against one stored reference.
    metric: Literal["val_loss", "fd_classifier", "fid"] = "val_loss"
    promote_margin: float = Field(0.0, ge=0.0)  # promote when cand < champ - margin (metric)
    images: int = Field(20_000, ge=1)  # images the candidate trains for (from its start)
    from_scratch: bool = False  # fresh weights instead of the champion's checkpoint
    alias: str = Field("champion", min_length=1)  # registry alias that marks the champion
    # a registered version to judge instead of training one (a reflow or distilled student
    # of the champion: models:/<name>/<version>); sampled at its own rule, promoted when it
    # needs no more NFE than the champion and beats it on `metric` (pipeline/promote.py)
    candidate: str = ""


class ReflowConfig(Section):
    """`fmpipe reflow`: a k-rectified flow trained on a base model's own couplings.

    The pairs are sampled from ``base`` with the sample section's sampler (``sample.solver``,
    ``sample.steps``, ``sample.seed``, ``sample.num_actors``, ...) into ``pairs_out``, then
    trained on (``data.pairs``) from the base's weights with the train section's settings.
    """

    base: str = (
        ""  # the model to straighten: models:/<name>@<alias>, models:/<name>/<v>, a checkpoint
    )
    # pairs sampled from the base: ~6x the digits train split, so the flow cannot memorise its
    # couplings (the 2-D test: 10k pairs bring 1-step quality near the base's 64-step)
    num_pairs: int = Field(10_000, ge=2)
    # where the pairs go; empty: <train.storage_path>/reflow-pairs/<base digest>-<sampler>-<N>
    pairs_out: str = ""


class EvalConfig(Section):
    """`fmpipe eval`, `fmpipe classifier` and the evaluations inside train, sample and retrain.

    A sample set is scored against reference statistics of the dataset's
    ``reference_split`` (the training split by default, as FID is usually reported: the
    distribution the model learnt), computed once per (dataset content, split, network,
    resolution) and stored under ``train.storage_path`` (``eval-reference/``), never
    beside the data. Real held-out images (the ``val`` split) scored against the same
    reference give the floor a perfect model would reach at that sample size.
    """

    # inception: FID's TF Inception-v3 (2048-d); classifier: fmpipe's own in-domain
    # classifier (Fréchet distance of its penultimate features + conditional accuracy).
    network: Literal["inception", "classifier"] = "classifier"
    inception_uri: str = ""  # TorchScript weights (path, s3://, https://); "": NVIDIA's file
    inception_sha256: str = ""  # expected digest of that file ("": not checked)
    # The classifier: models:/<name>@<alias>, a run's artifact or a classifier file;
    # "": models:/<registered model>-classifier@champion (written by `fmpipe classifier`).
    classifier: str = ""
    reference_split: str = Field("train", min_length=1)
    # Statistics another tool published (path, s3://): an .npz with mu (d,) and sigma (d, d),
    # as pytorch-fid, clean-fid and ADM's reference batches store them, or an fmpipe
    # eval-reference file. Scores are then against it, not reference_split: FD only for
    # mu/sigma files (KID and precision/recall need the reference's features). "": none.
    reference_stats: str = ""
    num_samples: int = Field(1000, ge=2)  # samples a model's evaluation generates
    seed: int = 1_000_003  # their noise seed: fixed, so candidate and champion share it
    solver: SolverName = "euler"  # a model's evaluation integrates with this solver...
    steps: int = Field(32, ge=1)  # ...and this many steps
    batch_size: int = Field(64, ge=1)  # images per feature-network call
    num_actors: int = Field(1, ge=1)
    use_gpu: bool = False
    # Sets of at most this many images are read in the driver itself (extract_local): the Ray
    # job's start-up (decode tasks, actors building the network) costs more than such a set's
    # features. 0: always the Ray job. GPU runs always take the Ray job.
    local_max_images: int = Field(2048, ge=0)
    keep_features: int = Field(10_000, ge=4)  # rows kept per set for KID and precision/recall
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    pr_k: int = Field(3, ge=1)  # neighbour rank of the precision/recall balls
    sweep_solvers: list[SolverName] = Field(default_factory=lambda: ["euler", "heun"])
    sweep_steps: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    # `fmpipe classifier`: its training
    classifier_epochs: int = Field(10, ge=1)
    classifier_batch_size: int = Field(128, ge=1)
    classifier_lr: float = Field(5e-3, gt=0.0)


class StorageConfig(Section):
    # Endpoint override for S3-compatible stores; AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL win
    # when set. No credential fields on purpose: the standard AWS chain supplies them.
    endpoint_url: str = ""
    region: str = "us-east-1"


class TrackingConfig(Section):
    uri: str = ""  # MLflow tracking URI; MLFLOW_TRACKING_URI wins; empty: local sqlite
    experiment: str = "fmpipe"
    sample_experiment: str = "fmpipe-samples"
    eval_experiment: str = "fmpipe-eval"  # fmpipe eval and fmpipe classifier runs


class ToyConfig(Section):
    """The 2-D example (`fmpipe toy`): plain PyTorch on CPU, no Ray."""

    source: Literal["normal", "8gaussians"] = "normal"  # distribution of x_0
    target: Literal["moons", "8gaussians"] = "moons"  # distribution of x_1
    out: str = ""  # directory for the PNG and model; empty: $FMPIPE_HOME/toy
    num_trajectories: int = Field(64, ge=0)  # paths drawn in the plot


class Config(Section):
    seed: int = 0  # every random draw (noise, t, shuffles, init) derives from this
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    reflow: ReflowConfig = Field(default_factory=ReflowConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    toy: ToyConfig = Field(default_factory=ToyConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what MLflow logs and checkpoints carry)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 2e-4, ...}``: one entry per leaf, for MLflow params."""
        return _flatten(self.to_dict())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _check_keys(tree: Any, model: type[BaseModel], prefix: str) -> None:
    """Raise ConfigError for the first unknown key, naming the keys that are allowed."""
    if not isinstance(tree, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(tree).__name__}")
    for key, value in tree.items():
        if key not in model.model_fields:
            allowed = ", ".join(_allowed_keys(model))
            raise ConfigError(f"unknown config key '{prefix}{key}'; allowed here: {allowed}")
        annotation = model.model_fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(value, annotation, f"{prefix}{key}.")


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "config"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        message = str(item["msg"]).removeprefix("Value error, ")
        lines.append(f"invalid value for '{key}'{shown}: {message}")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{key}': value {raw!r} is not valid YAML: {exc}") from None
    return parts, value


def _set_path(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(parts[: depth + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def build_config(
    base: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Validate ``base`` (nested dict) with ``overrides`` applied on top, or raise ConfigError."""
    tree: dict[str, Any] = copy.deepcopy(base) if base else {}
    for text in overrides:
        parts, value = parse_override(text)
        _set_path(tree, parts, value)
    _check_keys(tree, Config, "")
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> Config:
    """Load ``defaults`` < YAML file at ``path`` < ``overrides`` into a validated Config."""
    tree: dict[str, Any] = copy.deepcopy(defaults) if defaults else {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file '{file}' does not exist")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{file}' is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{file}' must hold a mapping at the top level")
        tree = merge_trees(tree, loaded)
    return build_config(tree, overrides)


def merge_trees(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def dataset_name(address: str) -> str:
    """An MLflow-safe name for the dataset at ``address`` (``data.uri``): the last component
    of its folder; for a brace pattern, a ``.tar`` or a list, of the shards' common folder.
    ``""`` when nothing usable is left (e.g. a bare bucket root)."""
    import posixpath

    parts, depth, current = [], 0, ""
    for char in address:
        depth += (char == "{") - (char == "}")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    folders = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if "{" in part:
            part = part.split("{", 1)[0].rsplit("/", 1)[0]
        elif part.endswith(".tar"):
            part = part.rsplit("/", 1)[0]
        folders.append(part.rstrip("/").replace("://", ":/"))
    if not folders:
        return ""
    common = posixpath.commonpath(folders) if len(folders) > 1 else folders[0]
    last = common.rstrip("/").rsplit("/", 1)[-1]
    if last.endswith(":") or not last:
        return ""  # s3://bucket would name the bucket's scheme
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-._")
    return name[:100]


NO_REGISTRATION = "none"  # train.registered_model_name=none: `fmpipe train` registers nothing


def default_names(cfg: Config) -> None:
    """Fill the names ``fmpipe train`` / ``fmpipe retrain`` take from the dataset when the
    config leaves them empty: ``train.registered_model_name`` and ``train.run_name`` become
    the dataset's name (:func:`dataset_name` of ``data.uri``; ``digits`` for the demo's
    dataset, whose folder is ``digits``), else ``dataset``. So a second dataset trains in a
    run (and registers a model) of its own instead of meeting the first one's checkpoints.
    ``registered_model_name=none`` means do not register. Programmatic configs keep the
    library defaults (run ``fmpipe``, registering nothing): only the jobs call this."""
    name = dataset_name(cfg.data.uri) or "dataset"
    registered = cfg.train.registered_model_name.strip()
    if registered.lower() == NO_REGISTRATION:
        cfg.train.registered_model_name = ""
    elif not registered:
        cfg.train.registered_model_name = name
    if not cfg.train.run_name.strip():
        cfg.train.run_name = name
