"""The typed run configuration: its sections, their fields and limits, and the checks of
settings that are each valid but cannot work together (``check_combinations``).

Longer than 320 lines: every section of the config is one table that a reader scans top to
bottom, next to the cross-section checks that refer to all of them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bloomray.cpu import emulates_bf16
from bloomray.errors import EXIT_USAGE, BloomrayError


class ConfigError(BloomrayError, ValueError):
    """A configuration problem, phrased for the person who wrote the config.

    Exit code 2: a key, value, combination, preset or ``--resume`` dir is wrong.
    """

    exit_code = EXIT_USAGE


class _Section(BaseModel):
    # Unknown keys are errors (a typo must never be silently ignored). YAML and --set parse
    # `labels: [0, 1]` or `output.dir=2024` as numbers; string fields take them as text.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class LoraConfig(_Section):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["query_key_value"]


class ModelConfig(_Section):
    preset: Literal["tiny", "small", "bloom-560m", "bloom-1b7", "bloom-7b1"] = "tiny"
    path: str | None = None  # local HF dir (or hub name) for from_pretrained; overrides preset
    # Preset models only: the embedding rows (BLOOM pads 250,680 tokens to 250,880); None = the
    # tokenizer's size. Must hold every tokenizer id.
    vocab_size: int | None = Field(None, ge=8)
    num_labels: int | None = Field(None, ge=2)  # classification; default: from the data
    activation_checkpointing: bool = False
    lora: LoraConfig = LoraConfig()


class TokenizerConfig(_Section):
    path: str | None = None  # HF tokenizer dir; None = train byte-level BPE on the corpus
    vocab_size: int = Field(4096, ge=260)
    min_frequency: int = Field(2, ge=1)


class RedactConfig(_Section):
    """PII masking before tokenization (``bloomray.data.redact``); ``data.redact=true`` enables it."""

    enabled: bool = False
    kinds: list[Literal["email", "phone", "ip", "digits"]] = ["email", "phone", "ip", "digits"]
    patterns: list[str] = []  # your own regexes, each replaced by <REDACTED> (applied first)
    min_digits: int = Field(6, ge=3)  # "digits": runs of at least this many digits

    @model_validator(mode="before")
    @classmethod
    def _bool_shorthand(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for pat in v:
            try:
                rx = re.compile(pat)
            except re.error as exc:
                raise ValueError(f"pattern {pat!r} is not a valid regex ({exc})") from None
            if rx.fullmatch(""):
                raise ValueError(f"pattern {pat!r} matches the empty string; it must match some text")
        return v


class DataConfig(_Section):
    path: str | None = None  # file, folder, HF dataset dir or hub name, prepared dir or URI; None = embedded
    eval_path: str | None = None  # separate eval file; None = hold out eval_fraction
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = None  # classification label names, in id order
    block_size: int = Field(128, ge=8)
    eval_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    max_documents: int | None = Field(None, ge=1)
    bad_rows: Literal["skip", "fail"] = "skip"
    seed: int = 0
    tokenizer: TokenizerConfig = TokenizerConfig()
    redact: RedactConfig = RedactConfig()


class TrainConfig(_Section):
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    global_batch_size: int = Field(16, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_max_batches: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    # torch.compile the model (through DeepSpeed's engine.compile): faster steps after a
    # one-off compile of tens of seconds; pays off for long runs. ZeRO 0-2 only.
    compile: bool = False
    # Each rank appends the example ids of every step to OUTPUT/logs/samples/ (JSONL): an audit
    # that a run, resumed or not, saw each example of its schedule once.
    log_sample_ids: bool = False


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    # auto: bf16 on GPUs and on CPUs with AVX-512 (or not x86); fp32 on x86 CPUs without
    # AVX-512, which emulate bf16 GEMMs ~65x below their fp32 rate (training ~16x slower).
    # Resolved when the config is loaded, on that machine; the run records the result, so a
    # resume keeps it. The CPU presets use it.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "bf16"
    # auto: cpu_adam (DeepSpeedCPUAdam) where the optimizer runs on the CPU (CPU workers,
    # ZeRO-Offload), adamw (torch AdamW) on GPU; chosen in train.engine.build_optimizer.
    optimizer: Literal["auto", "adamw", "cpu_adam", "fused_adam"] = "auto"
    offload_optimizer: bool = False
    offload_params: bool = False


class ScalingConfig(_Section):
    # A count, or [min, max]: Ray Train's elastic group starts with as many workers as the
    # cluster has room for (at least min) and restarts on whatever size it gets back after a
    # failure; each start resumes the latest checkpoint on its own size (train/universal.py).
    num_workers: int | tuple[int, int] = 2
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    worker_start_timeout_s: float = Field(120.0, gt=0.0)
    peak_tflops: float | None = Field(None, gt=0.0)  # per worker; None = measure at start

    @field_validator("num_workers", mode="before")
    @classmethod
    def _count_or_range(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            if len(v) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in v):
                raise ValueError("a range is [min, max], two worker counts")
            v = tuple(v)
        lo, hi = v if isinstance(v, tuple) else (v, v)
        if isinstance(lo, int) and lo < 1:
            raise ValueError("must be at least 1: a worker count, or a range [min, max]")
        if isinstance(v, tuple) and lo > hi:
            raise ValueError(f"[{lo}, {hi}]: the minimum is above the maximum")
        return v

    @property
    def elastic(self) -> bool:
        """Whether ``num_workers`` is a range ``[min, max]``."""
        return isinstance(self.num_workers, tuple)

    @property
    def worker_counts(self) -> range:
        """Every worker count the run may train on (one, unless ``num_workers`` is a range)."""
        lo, hi = self.num_workers if isinstance(self.num_workers, tuple) else (self.num_workers,) * 2
        return range(lo, hi + 1)


class OutputConfig(_Section):
    dir: str = "outputs/run"
    storage_path: str | None = None  # where checkpoints go; None = OUTPUT/ (use shared storage on a cluster)
    mlflow_tracking_uri: str | None = None  # None = local file store under OUTPUT/logs/mlruns
    tensorboard: bool = True
    export: bool = True


# Head sizes vLLM's CPU attention kernels run: a shape served on CPU, or measured in the engine
# for the decode_rel objective, needs one of them.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)

# BLOOM block Linears that can be pruned (embeddings, LayerNorms, the tied head cannot).
PRUNABLE_MODULES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


# One-shot methods with calibration data (``bloomray prune --model DIR``, ``prune/oneshot.py``);
# in training they set the initial masks (``check_trainable``, ``prune/initial.py``).
ONESHOT_METHODS = ("wanda", "sparsegpt")


class DistillConfig(_Section):
    """Recovery with knowledge distillation from the dense teacher (``train/distill.py``)."""

    enabled: bool = False
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the KL term; 1 - alpha on the LM loss
    temperature: float = Field(2.0, gt=0.0)
    teacher: str | None = None  # a model dir or hub name; None: model.path (the starting model)


class PruneConfig(_Section):
    """Sparsity during training (what to prune, how much, and when), or of a one-shot ``bloomray prune``."""

    method: Literal["none", "magnitude", "structured", "2:4", "wanda", "sparsegpt"] = "none"
    scope: Literal["layer", "global"] = "layer"  # magnitude: per-layer or one global threshold
    structure: Literal["mlp", "heads", "mlp+heads"] = "mlp"  # structured: MLP neurons, heads or both
    importance: Literal["magnitude", "taylor"] = "magnitude"  # taylor = accumulated |weight x grad|
    schedule: Literal["cubic", "linear", "exponential", "one_shot"] = "cubic"
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    final_sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    start_fraction: float = Field(0.1, ge=0.0, le=1.0)  # of train steps
    end_fraction: float = Field(0.7, ge=0.0, le=1.0)
    update_every: int = Field(10, ge=1)  # steps between mask updates
    targets: list[str] = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    # One-shot methods (`bloomray prune`, and wanda/sparsegpt as a training run's initial masks):
    # the sparsity pattern of wanda/sparsegpt/magnitude, the calibration set (the first train
    # blocks of data.block_size tokens), and SparseGPT's Hessian dampening (fraction of its mean
    # diagonal) and lazy-update column block width.
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    calibration_samples: int = Field(128, ge=1)
    percdamp: float = Field(0.01, gt=0.0)
    blocksize: int = Field(128, ge=1)
    distill: DistillConfig = DistillConfig()

    @field_validator("method", "pattern", mode="before")
    @classmethod
    def _unquoted_two_four(cls, v: Any) -> Any:
        return "2:4" if v == 124 else v  # YAML 1.1 reads an unquoted 2:4 as base-60 2*60+4


class SpaceParam(_Section):
    """One searched config key: ``loguniform``/``uniform`` take low/high, ``choice``/``grid`` values."""

    type: Literal["loguniform", "uniform", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check_range(self) -> SpaceParam:
        if self.type in ("loguniform", "uniform"):
            if self.low is None or self.high is None:
                raise ValueError(f"type={self.type} needs low and high")
            if not self.low < self.high:
                raise ValueError(f"low={self.low} must be below high={self.high}")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0, got low={self.low}")
        elif not self.values:
            raise ValueError(f"type={self.type} needs a non-empty values list")
        return self


# What a multi-objective search (``tune.objectives``) can trade off, and which way is better:
# the trial's eval metrics, its export's forward latency (transformers, select.latency_batch x
# latency_seq, measured in the trial; the Pareto front re-measures every export in interleaved
# rounds), its decode latency in the serving engine relative to the dense shape (vLLM, the same
# request mix for every trial, rounds interleaved with the dense reference: tune/engine_latency.py),
# size on disk, and sparsity.
Objective = Literal[
    "eval_loss", "eval_accuracy", "eval_macro_f1", "latency_ms", "decode_rel", "size_mb", "sparsity"
]
OBJECTIVES: dict[str, Literal["min", "max"]] = {
    "eval_loss": "min",
    "eval_accuracy": "max",
    "eval_macro_f1": "max",
    "latency_ms": "min",
    "decode_rel": "min",
    "size_mb": "min",
    "sparsity": "max",
}


class TuneConfig(_Section):
    """The Ray Tune search: space, algorithm, early stopping, retries."""

    space: dict[str, SpaceParam] = {}
    search: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = Field(4, ge=1)  # random/optuna: trials; grid: repeats of the grid
    metric: Literal["eval_loss", "eval_accuracy", "eval_macro_f1"] = "eval_loss"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(2, ge=1)  # ASHA: reports before a trial can be stopped
    reduction_factor: int = Field(2, ge=2)
    max_concurrent_trials: int = Field(1, ge=1)
    max_failures: int = Field(1, ge=0)  # retries of a failed trial before it is reported ERROR
    seed: int = 0
    # Two or more: a multi-objective search (tune.search=optuna, tune.scheduler=fifo) on all of
    # them at once with Optuna's NSGA-II (or TPE, or random) sampler; the Pareto front over them is marked in
    # trials.csv and the winner is chosen from it by the select.* rules. Must include tune.metric.
    objectives: list[Objective] = []
    sampler: Literal["nsga2", "tpe", "random"] = "nsga2"  # random: the baseline to compare a search against
    # NSGA-II's generation size (TPE: its random startup trials). Default: num_samples // 3 in
    # [2, 50], so a search evolves for at least three generations instead of spending its whole
    # budget on the random first one (Optuna's own default is 50).
    population_size: int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _check_objectives(self) -> TuneConfig:
        obj = self.objectives
        if not obj:
            return self
        if len(obj) < 2 or len(set(obj)) != len(obj):
            raise ValueError(
                f"tune.objectives={obj} needs two or more different metrics; for one, set tune.metric "
                "and leave tune.objectives empty"
            )
        if self.metric not in obj:
            raise ValueError(
                f"tune.objectives={obj} must include tune.metric={self.metric} (the quality the winner "
                "is chosen on)"
            )
        if self.search != "optuna":
            raise ValueError(
                f"tune.objectives needs tune.search=optuna (a multi-objective sampler), got {self.search}"
            )
        if self.scheduler != "fifo":
            raise ValueError(
                "tune.objectives needs tune.scheduler=fifo: ASHA stops trials on one metric, "
                "which would bias a multi-objective search"
            )
        return self


class SelectConfig(_Section):
    """Winner selection: best quality within a budget, else the knee of the Pareto front."""

    max_latency_ms: float | None = Field(None, gt=0)
    min_sparsity: float | None = Field(None, ge=0, lt=1)
    latency_batch: int = Field(4, ge=1)  # requests (forward: rows) of the latency measurements
    latency_seq: int = Field(64, ge=1)  # their prompt tokens
    decode_tokens: int = Field(32, ge=1)  # tokens each request generates for decode_rel


class RayConfig(_Section):
    address: str | None = None  # None = start a local Ray (or join RAY_ADDRESS)
    num_cpus: int | None = Field(None, ge=1)  # logical CPUs for a local Ray


class Config(_Section):
    task: Literal["causal_lm", "classification", "sft"] = "causal_lm"  # sft: instruction tuning
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    output: OutputConfig = OutputConfig()
    prune: PruneConfig = PruneConfig()
    tune: TuneConfig = TuneConfig()
    select: SelectConfig = SelectConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        if self.deepspeed.precision == "auto":
            self.deepspeed.precision = auto_precision(self.scaling.use_gpu)
        check_combinations(self)
        return self

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per worker and optimizer step, for a fixed ``scaling.num_workers``."""
        return self.grad_accum_for(None)

    def grad_accum_for(self, world_size: int | None) -> int:
        """Micro-batches per worker and optimizer step on ``world_size`` workers (the global
        batch stays). None: the configured count, which must then be fixed, not a range.

        Raises:
            ValueError: ``world_size`` is None and ``scaling.num_workers`` is a range.
        """
        t, s = self.train, self.scaling
        if world_size is None:
            if isinstance(s.num_workers, tuple):
                raise ValueError(
                    "scaling.num_workers is a range: the accumulation depends on the actual size"
                )
            world_size = s.num_workers
        return t.global_batch_size // (t.micro_batch_size * world_size)


def auto_precision(use_gpu: bool) -> Literal["bf16", "fp32"]:
    """What ``deepspeed.precision: auto`` means on this machine (see DeepSpeedConfig)."""
    return "fp32" if not use_gpu and emulates_bf16() else "bf16"


def check_combinations(cfg: Config) -> None:
    """Reject settings that are each valid but cannot work together.

    Raises:
        ValueError: naming the keys involved and a setting that works.
    """
    t, ds, s = cfg.train, cfg.deepspeed, cfg.scaling
    bad = [n for n in s.worker_counts if t.global_batch_size % (t.micro_batch_size * n)]
    if bad and not s.elastic:
        per_step = t.micro_batch_size * bad[0]
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size * scaling.num_workers = {t.micro_batch_size} * "
            f"{bad[0]} = {per_step}; pick a multiple of {per_step}"
        )
    if bad:
        lcm = math.lcm(*(t.micro_batch_size * n for n in s.worker_counts))
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size * workers = {t.micro_batch_size} * n for n = {bad} of "
            f"scaling.num_workers=[{s.worker_counts[0]}, {s.worker_counts[-1]}]; every size in the range "
            f"must split the global batch: narrow the range, or pick a multiple of {lcm}"
        )
    if t.max_steps is None and t.epochs is None:
        raise ValueError("set train.max_steps or train.epochs")
    if ds.precision == "fp16" and not s.use_gpu:
        raise ValueError(
            "deepspeed.precision=fp16 needs a GPU (scaling.use_gpu=true); on CPU use bf16 or fp32"
        )
    if ds.optimizer == "fused_adam" and not s.use_gpu:
        raise ValueError("deepspeed.optimizer=fused_adam needs a GPU; on CPU use auto, cpu_adam or adamw")
    if (ds.offload_optimizer or ds.offload_params) and ds.optimizer not in ("auto", "cpu_adam"):
        raise ValueError(
            "ZeRO-Offload (deepspeed.offload_optimizer/offload_params) runs the optimizer on "
            "the CPU and needs deepspeed.optimizer=cpu_adam (DeepSpeedCPUAdam) or auto; "
            f"got deepspeed.optimizer={ds.optimizer}"
        )
    kd = cfg.prune.distill
    if kd.enabled and not (kd.teacher or cfg.model.path):
        raise ValueError(
            "prune.distill.enabled=true needs a teacher: set model.path to the dense model the run "
            "starts from (it becomes the teacher), or prune.distill.teacher to another model dir"
        )
    if t.compile and ds.zero_stage == 3:
        raise ValueError(
            "train.compile=true needs deepspeed.zero_stage 0, 1 or 2: ZeRO-3 gathers each layer's "
            "parameters inside the forward, which torch.compile cannot trace; set train.compile=false "
            "or choose another stage"
        )
    if ds.offload_params and ds.zero_stage != 3:
        raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage=3")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3")
    if cfg.model.lora.enabled and cfg.model.path is None:
        raise ValueError(
            "model.lora.enabled=true trains adapters on a pretrained model: set model.path "
            "to a model directory (LoRA on random weights learns nothing useful)"
        )
    if cfg.model.vocab_size is not None and cfg.model.path is not None:
        raise ValueError(
            "model.vocab_size sizes a preset model's embeddings; a pretrained model.path keeps its own "
            "vocabulary: unset model.vocab_size"
        )
    p = cfg.prune
    if p.method != "none":
        if p.end_fraction < p.start_fraction:
            raise ValueError(
                f"prune.end_fraction={p.end_fraction} is before prune.start_fraction={p.start_fraction}"
            )
        if p.final_sparsity < p.initial_sparsity:
            raise ValueError(
                f"prune.final_sparsity={p.final_sparsity} is below prune.initial_sparsity={p.initial_sparsity}"
            )
        if p.method == "2:4" and p.final_sparsity != 0.5:
            raise ValueError("prune.method=2:4 keeps 2 of every 4 weights: prune.final_sparsity must be 0.5")
        if p.pattern == "2:4" and p.method in ("magnitude", *ONESHOT_METHODS) and p.final_sparsity != 0.5:
            raise ValueError(
                "prune.pattern=2:4 keeps 2 of every 4 weights: prune.final_sparsity must be 0.5, "
                f"got {p.final_sparsity}"
            )
        unknown = sorted(set(p.targets) - set(PRUNABLE_MODULES))
        if unknown or not p.targets:
            raise ValueError(
                f"prune.targets has {unknown or 'nothing'}; choose from {list(PRUNABLE_MODULES)}"
            )
        if cfg.model.lora.enabled:
            raise ValueError(
                "prune with model.lora.enabled: LoRA freezes the weights being pruned; disable one"
            )
    if cfg.data.labels is not None and len(set(cfg.data.labels)) != len(cfg.data.labels):
        raise ValueError(f"data.labels has duplicates: {cfg.data.labels}")


def check_trainable(cfg: Config) -> None:
    """Reject what the schema accepts but training cannot run.

    ``prune.method`` wanda or sparsegpt in training prunes the starting model one-shot with
    calibration data before the first step (``prune/initial.py``) at ``prune.initial_sparsity``
    (0.5 with ``prune.pattern=2:4``); the schedule then goes on by magnitude to
    ``prune.final_sparsity``, never reviving a pruned weight.

    Raises:
        ConfigError: a one-shot method without a trained ``model.path``, without an initial
            sparsity, or with task=sft; magnitude with the one-shot ``prune.pattern=2:4``.
    """
    p = cfg.prune
    if p.method in ONESHOT_METHODS:
        if not cfg.model.path:
            raise ConfigError(
                f"prune.method={p.method} prunes a trained model with calibration data before the "
                "first step: set model.path to that model's dir (or run `bloomray prune --model "
                "MODEL_DIR --config CFG --output OUT` on an export)"
            )
        if cfg.task == "sft":
            raise ConfigError(
                f"prune.method={p.method} calibrates a causal LM or a classifier on its text: set task "
                "causal_lm or classification, or use prune.method magnitude or structured for sft"
            )
        if p.pattern == "2:4" and p.initial_sparsity != 0.5:
            raise ConfigError(
                f"prune.method={p.method} with prune.pattern=2:4 starts from 2 of every 4 weights: set "
                f"prune.initial_sparsity=0.5 (and final_sparsity=0.5), got {p.initial_sparsity}"
            )
        if p.initial_sparsity <= 0.0:
            raise ConfigError(
                f"prune.method={p.method} sets the run's initial masks one-shot at prune.initial_sparsity, "
                "which is 0: set it, e.g. prune.initial_sparsity=0.5 with final_sparsity=0.5 for one-shot "
                "pruning then recovery"
            )
    if p.method == "magnitude" and p.pattern == "2:4":
        raise ConfigError(
            "prune.pattern is for `bloomray prune`; for 2:4 sparsity during training set "
            "prune.method=2:4 (and leave prune.pattern unset)"
        )


# --------------------------------------------------------------------------- loading
