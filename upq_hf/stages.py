"""The stages of the recipes and their configs: one small typed config per stage, each default written here once.

A recipe (:data:`upq_hf.recipes.RECIPES`) names the stages it runs; ``UPQConfig`` carries one config per stage,
given as the dataclass or as a dict of its fields::

    UPQConfig(bits=2, recipe="upq", ptq=PTQConfig(epochs=6), distill={"steps": 20})

The command line takes them from ``--config FILE`` (YAML or JSON, ``{"ptq": {"epochs": 6}, ...}``) and
``upq quantize --print-config`` shows them resolved. Each field that was measured against the alternatives says
where (docs/BENCHMARKS.md); the defaults are the measured winners on the bundled SmolLM2-135M-Instruct.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .formats import SCALE_INITS

MIXED_PRECISIONS = ("auto", "bf16", "no")
INT2_TARGETS = ("int4", "dense")


def _is_number(value, integer: bool = False) -> bool:
    """An int (or, unless ``integer``, a float), never a bool."""
    return isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)


def _positive_int(config, *names: str, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        if not _is_number(value, integer=True) or value <= 0:
            raise ValueError(f"{type(config).__name__}: {name} must be a positive integer"
                             f"{' or None' if allow_none else ''}, got {value!r}")


def _positive_number(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not _is_number(value) or not value > 0:
            raise ValueError(f"{type(config).__name__}: {name} must be positive, got {value!r}")


def _non_negative(config, *names: str, integer: bool = False, meaning: str = "") -> None:
    """``names`` >= 0; ``meaning`` (e.g. " (0: none)") follows the message's type."""
    for name in names:
        value = getattr(config, name)
        if not _is_number(value, integer) or value < 0:
            raise ValueError(f"{type(config).__name__}: {name} must be a non-negative "
                             f"{'integer' if integer else 'number'}{meaning}, got {value!r}")


@dataclass
class RTNConfig:
    """Round to nearest: the whole of recipe ``rtn``, and where every other recipe starts (and a block whose
    reconstruction does not improve on it ends).

    scale_init: the scale of each group: ``"mse"``, the shrink of the range (searched over 31 fractions) that
        minimises the group's rounding error, or ``"max"``, the range itself (ParetoQ's start, kept for comparisons
        with it).
    """

    scale_init: str = "mse"

    def __post_init__(self):
        if self.scale_init not in SCALE_INITS:
            raise ValueError(f"RTNConfig: scale_init must be one of {list(SCALE_INITS)}, got {self.scale_init!r}")


@dataclass
class DataConfig:
    """The text calibration and training read (recipes ``ptq``, ``upq``, ``ntp``, ``distill``).

    dataset: ``"self"`` (the model's own greedy answers to upq_hf's built-in chat prompts: offline, no private
        data), a Hub dataset name, a local .txt/.jsonl/.parquet file or folder, or a list of strings.
    prompts: how many built-in prompts ``"self"`` answers (None: all of them, 331).
    calibration_samples, calibration_seqlen: the sequences block-wise PTQ reconstructs on.
    """

    dataset: Any = "self"
    prompts: int | None = None
    calibration_samples: int = 128
    calibration_seqlen: int = 128

    def __post_init__(self):
        _positive_int(self, "calibration_samples", "calibration_seqlen")
        _positive_int(self, "prompts", allow_none=True)


@dataclass
class PTQConfig:
    """Block-wise PTQ (EfficientQAT's Block-AP, :mod:`upq_hf.ptq`): each decoder block's latent weights, scales and
    INT4 zero points trained to reconstruct the unquantized block's output, token by token relative to the
    token's size (the error as the next block's norm sees it; plain MSE and a per-channel weighting measured
    worse, docs/BENCHMARKS.md).

    epochs: passes over the calibration set per block, INT2 (and ``ptq`` at any bits); 9 measured better than 6
        over training seeds (docs/BENCHMARKS.md). ``steps``, if set, is the number of steps per block instead.
    int4_epochs: the same for the INT4 stage of ``upq`` (the paper's progression, FP -> INT4 -> INT2); 0 (the
        default): no INT4 stage, the INT2 reconstruction starts from the unquantized weights (EfficientQAT's Block-AP
        at INT2), then the same distillation. On the bundled model the INT4 stage cost its time and lost on
        top-1, KL and answers over two seeds (docs/BENCHMARKS.md, "What the INT4 stage buys").
    int2_target: what ``upq``'s INT2 reconstruction matches: ``"int4"``, each block as the INT4 stage left its
        latent weights (the paper's progression: INT4 -> INT2), or ``"dense"``, the unquantized block (the INT4
        latents only as the start).
    batch_size: calibration sequences per step.
    holdout: the share of calibration sequences held out to choose each block's state (its round-to-nearest start
        included): the block ends in the state with the lowest held-out error, checked ``checks`` times per block.
        0: no hold-out (the block keeps its start if training raised its error).
    learning_rate: of the latent weights, in units of their group's starting quantization step (0: frozen).
    scale_learning_rate: of the scales, relative to their start (and of INT4 zero points, in codes).
    """

    epochs: int = 9
    int4_epochs: int = 0
    batch_size: int = 8
    holdout: float = 0.125
    learning_rate: float = 0.01
    scale_learning_rate: float = 3e-3
    steps: int | None = None
    checks: int = 8
    int2_target: str = "int4"

    def __post_init__(self):
        _positive_int(self, "epochs", "batch_size", "checks")
        _non_negative(self, "int4_epochs", integer=True, meaning=" (0: no INT4 stage)")
        if self.int2_target not in INT2_TARGETS:
            raise ValueError(f"PTQConfig: int2_target must be one of {list(INT2_TARGETS)}, got {self.int2_target!r}")
        _positive_int(self, "steps", allow_none=True)
        if not _is_number(self.holdout) or not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"PTQConfig: holdout is the share of calibration sequences held out, in [0, 1), "
                             f"got {self.holdout!r}")
        _non_negative(self, "learning_rate", "scale_learning_rate")


@dataclass
class DistillConfig:
    """Distill-QAT (:mod:`upq_hf.distill`): the student trained to match the unquantized teacher's next-token
    distributions with the generalized Jensen-Shannon divergence (recipes ``upq``, ``distill``; ``ntp`` trains
    on next-token cross-entropy with the same budget). ``upq`` keeps the codes of its INT2 reconstruction and
    trains the scales and norm weights alone (training the latent weights flipped well-placed codes and cost
    answers, docs/BENCHMARKS.md); ``ntp`` and ``distill`` start from the dense weights and train them too.

    steps, batch_size, seqlen: the budget (tokens = their product).
    samples: distinct training sequences (None: steps x batch_size).
    sampled_answers: with ``"self"`` data, that many answers per prompt sampled from the teacher (temperature 0.7)
        beside its greedy one, for the distillation alone (the reconstruction's calibration text stays the greedy
        answers); 0: the greedy answers alone.
    learning_rate: of the latent weights (``ntp``, ``distill``), as the fraction of a quantization step a weight
        moves per update.
    scale_learning_rate: of the scales and norm weights, as their relative change per update.
    beta: of the generalized JSD; 0 is its forward-KL limit, KL(teacher || student), measured ahead of 0.1 to 0.5
        (a bounded JSD gives almost no gradient where the student misses the teacher's choice).
    temperature: of both distributions.
    warmup: the share of the steps over which the learning rates rise linearly to their peak (then a cosine decay).
    teacher_topk: the teacher's top-k log-probabilities cached once before training (no teacher pass while
        training); 0: the teacher runs at every step over the full vocabulary (exact, slower).
    train_norms: train the normalisation layers' weights too.
    head_learning_rate: of the output head, as its relative change per update, where the head is a matrix of its
        own (a rotated model's, or a family's untied head); 0: it stays as the teacher has it. A tied head (the
        input embeddings too) never trains. The head is not quantized: training it costs nothing at inference.
    mixed_precision: ``"auto"`` (bf16 where the GPU or CPU multiplies it natively), ``"bf16"`` or ``"no"``.
    """

    steps: int = 60
    batch_size: int = 16
    seqlen: int = 128
    samples: int | None = 320
    sampled_answers: int = 0
    learning_rate: float = 0.02
    scale_learning_rate: float = 0.01
    beta: float = 0.0
    temperature: float = 1.0
    warmup: float = 0.05
    teacher_topk: int = 64
    train_norms: bool = True
    head_learning_rate: float = 0.0
    mixed_precision: str = "auto"

    def __post_init__(self):
        _positive_int(self, "steps", "batch_size", "seqlen")
        _positive_int(self, "samples", allow_none=True)
        _non_negative(self, "sampled_answers", integer=True, meaning=" (0: the teacher's greedy answers alone)")
        _positive_number(self, "learning_rate", "scale_learning_rate", "temperature")
        if not isinstance(self.beta, (int, float)) or not 0.0 <= float(self.beta) <= 1.0:
            raise ValueError(f"DistillConfig: beta must lie in [0, 1], got {self.beta!r}")
        _non_negative(self, "head_learning_rate", meaning=" (0: the head stays frozen)")
        if not _is_number(self.warmup) or not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"DistillConfig: warmup is the share of the steps spent warming up, in [0, 1), "
                             f"got {self.warmup!r}")
        _non_negative(self, "teacher_topk", integer=True, meaning=" (0: run the teacher while training)")
        if not isinstance(self.train_norms, bool):
            raise ValueError(f"DistillConfig: train_norms must be True or False, got {self.train_norms!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"DistillConfig: mixed_precision must be one of {list(MIXED_PRECISIONS)}, "
                             f"got {self.mixed_precision!r}")


@dataclass
class E2EQPConfig:
    """A last stage of ``upq`` (after Distill-QAT) or ``ptq`` (after the reconstruction): EfficientQAT's E2E-QP,
    every code fixed, the scales (and norm weights) trained against the unquantized model with the
    generalized JSD, on the distillation's data. Off by default: on the bundled model it added one answer on
    topic, not the two its rule asked (docs/BENCHMARKS.md).

    steps: 0 for none. learning_rate: relative change per update.
    """

    steps: int = 0
    learning_rate: float = 0.01

    def __post_init__(self):
        _non_negative(self, "steps", integer=True)
        _positive_number(self, "learning_rate")


#: every stage, under the name ``UPQConfig`` and ``--config`` files use for it
STAGES: dict[str, type] = {"rtn": RTNConfig, "data": DataConfig, "ptq": PTQConfig, "distill": DistillConfig,
                           "e2e_qp": E2EQPConfig}


#: named budgets: stage settings over the defaults (``upq quantize --budget NAME``; in Python
#: ``UPQConfig(recipe="upq", **upq_hf.config.budget("demo", "upq"))``). Each is measured (docs/BENCHMARKS.md).
BUDGETS: dict[str, dict[str, dict]] = {
    "default": {},
    "demo": {"data": {"prompts": 64, "calibration_samples": 64}, "ptq": {"epochs": 6},
             "distill": {"steps": 20, "samples": 64}},
}
BUDGET_HELP = {
    "default": "the defaults (upq on the bundled 135M model: 30 minutes on a 2-core Xeon)",
    "demo": "64 calibration sequences and prompts, 6 epochs of reconstruction, 20 distillation steps (make demo: "
            "about 10 minutes)",
}


def stage_config(name: str, value, strict: bool = True) -> Any:
    """The config of stage ``name`` from ``value``: the dataclass itself, a dict of its fields, or None (the
    defaults). Unknown fields are an error naming the stage and its fields (``strict``), or dropped (a
    config.json written by a newer upq_hf)."""
    cls = STAGES[name]
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"UPQConfig: {name} must be a {cls.__name__} or a dict of its fields, got {value!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown and strict:
        raise ValueError(f"UPQConfig: {cls.__name__} has no field {unknown[0]!r} (its fields: {sorted(known)})")
    return cls(**{key: item for key, item in value.items() if key in known})


def as_dict(config) -> dict:
    """A stage config as a JSON-serialisable dict (an in-memory dataset is named, not copied)."""
    out = asdict(config)
    if "dataset" in out and not isinstance(out["dataset"], (str, type(None))):
        out["dataset"] = f"<{len(out['dataset'])} texts given in memory>"
    return out
