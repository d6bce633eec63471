"""``UPQConfig``: what to quantize and how (validation and defaults, nothing else).

It is a ``transformers`` ``QuantizationConfigMixin`` so that it rides in ``config.json`` under
``quantization_config`` and is rebuilt by ``from_pretrained``; every attribute is JSON-serialisable.
"""

from __future__ import annotations

import re
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from . import backends
from .formats import SCALE_INITS, check_bits
from .packing import FORMAT_VERSION
from .recipes import RECIPES

SCALE_DTYPES = ("float16", "bfloat16", "float32")
PTQ_LOSSES = ("token", "mse", "channel")
MIXED_PRECISIONS = ("auto", "bf16", "no")
BACKENDS = (None, *backends.BACKENDS)
# Named mixes: module_bits patterns made from a model's own layer names (see mix_module_bits)
MIXES = {
    "kv4": "attention k_proj and v_proj at INT4 in every block, paid for by wider groups in the other layers: "
           "their group size is the smallest multiple of group_size that keeps the model's average bits per weight "
           "at what uniform INT2 at group_size costs (2.25 with group_size=64; on the bundled model: group 192)",
    "kv-edge": "attention k_proj and v_proj at INT4 in every block, and the FFN down_proj at INT4 in the first "
               "tenth and the last fifteenth of the blocks (at least one each: blocks 0-2 and 28-29 of 30)",
}
_KV = r"\.(k|v)_proj$"
_BLOCK_INDEX = re.compile(r"^(.*?)\.(\d+)\.")  # "model.layers.12.mlp.down_proj" -> ("model.layers", "12")


def mix_module_bits(mix: str, layers, bits: int = 2, group_size: int | None = 64, int4_group_size: int | None = 64,
                    scale_bytes: int = 2) -> dict[str, Any]:
    """The ``module_bits`` patterns of the named mix ``mix`` (a key of :data:`MIXES`) for a model whose
    quantized layers are ``layers`` (names, or ``{name: module}`` with ``in_features``/``out_features``, which
    ``"kv4"`` needs to hold its bit budget): the blocks are counted from the names, so the same mix fits any
    depth. Raises ``ValueError`` for a model whose layers the mix cannot place (no ``k_proj``/``v_proj``, no
    ``mlp.down_proj`` inside a numbered block)."""
    if mix not in MIXES:
        raise ValueError(f"UPQConfig: mix must be one of {list(MIXES)}, got {mix!r}")
    names = list(layers)
    kv = [n for n in names if re.search(_KV, n)]
    down = [match for n in names if n.endswith(".mlp.down_proj") and (match := _BLOCK_INDEX.match(n))]
    if not kv or (mix == "kv-edge" and not down):
        example = names[0] if names else "(none)"
        wanted = ("'model.layers.N.self_attn.k_proj', '...v_proj' and 'model.layers.N.mlp.down_proj'"
                  if mix == "kv-edge" else "'model.layers.N.self_attn.k_proj' and '...v_proj'")
        raise ValueError(f"UPQConfig: mix {mix!r} places layers named like {wanted}, and this model's layers look "
                         f"like {example!r}: give module_bits patterns for it instead")
    if mix == "kv4":
        if not hasattr(layers, "items"):
            raise ValueError("UPQConfig: mix 'kv4' needs the layers' shapes to hold its bit budget: pass "
                             "{name: module}, not names")
        shapes = {name: (module.in_features, module.out_features) for name, module in layers.items()}
        group = budget_group_size(shapes, set(kv), bits, group_size, int4_group_size, scale_bytes)
        return {_KV: 4, **({".": {"bits": bits, "group_size": group}} if group != group_size else {})}
    container = down[0].group(1)
    # counted over every layer of the container, so a block whose down_proj is left unquantized still counts
    n_blocks = 1 + max(int(m.group(2)) for n in names if (m := _BLOCK_INDEX.match(n)) and m.group(1) == container)
    first, last = -(-n_blocks // 10), -(-n_blocks // 15)
    edge = sorted(set(range(first)) | set(range(n_blocks - last, n_blocks)))
    down_pattern = rf"{re.escape(container.rpartition('.')[2])}\.({'|'.join(map(str, edge))})\.mlp\.down_proj$"
    return {_KV: 4, down_pattern: 4}


def budget_group_size(shapes: dict[str, tuple[int, int]], wider: set[str], bits: int, group_size: int | None,
                      int4_group_size: int | None, scale_bytes: int = 2) -> int | None:
    """The group size for the layers of ``shapes`` (``{name: (in_features, out_features)}``) not in ``wider``
    when those in ``wider`` go to INT4 at ``int4_group_size``: the smallest multiple of ``group_size`` that
    divides every such layer's input size and keeps the model's bits per weight (scales and zero points
    counted) at or under uniform ``bits`` at ``group_size``; the widest such multiple when none does (the mix
    then costs more than uniform), ``group_size`` itself when it has no dividing multiple (or is ``None``)."""
    from math import gcd

    from .packing import bits_per_weight

    if group_size is None:
        return None

    def cost(layers, b, group):
        return sum(k * n * bits_per_weight(b, group if group and k % group == 0 else None, k, scale_bytes)
                   for k, n in layers)

    rest = [shape for name, shape in shapes.items() if name not in wider]
    budget = cost(shapes.values(), bits, group_size)
    fixed = cost([shapes[name] for name in wider], 4, int4_group_size)
    common = 0
    for k, _ in rest:
        common = gcd(common, k)
    candidates = [g for g in range(group_size, common + 1, group_size) if common % g == 0]
    if not candidates:
        return group_size
    return next((g for g in candidates if fixed + cost(rest, bits, g) <= budget), candidates[-1])


def _ordered_patterns(module_bits) -> Any:
    """``module_bits`` as an ordered ``{pattern: spec}``, from a dict or from the ``[[pattern, spec], ...]`` list a
    saved config holds: transformers writes config.json with sorted keys, which would reorder a dict's patterns,
    and the first matching pattern decides. Anything else is returned for :meth:`UPQConfig._check_module_bits` to
    refuse."""
    if not module_bits:
        return None
    if isinstance(module_bits, dict):
        return dict(module_bits)
    if isinstance(module_bits, (list, tuple)) and all(isinstance(pair, (list, tuple)) and len(pair) == 2
                                                      for pair in module_bits):
        return {pattern: spec for pattern, spec in module_bits}
    return module_bits


class UPQConfig(QuantizationConfigMixin):
    r"""Configuration of a UPQ quantization.

    Args:
        bits: 2 (SEQ INT2, four levels ``(k - 1.5) * s``) or 4 (asymmetric INT4).
        group_size: input columns sharing one scale; ``None`` for one scale per output row.
        recipe: how the codes are found, a name in :data:`upq_hf.recipes.RECIPES`: ``"rtn"`` (round to
            nearest), ``"ptq"`` (block-wise PTQ), ``"upq"`` (PTQ to INT4, then INT2 Distill-QAT), ``"ntp"``
            (INT2 next-token QAT, ParetoQ's recipe) or ``"distill"`` (INT2 Distill-QAT without the INT4 stage).
        scale_init: initial scales: ``"max"`` (max |w|, ParetoQ) or ``"mse"`` (error-minimising search).
        scale_dtype: storage dtype of scales and zero points.
        modules_to_not_convert: module names (or name suffixes) to keep in high precision; the output
            and tied embeddings are always kept.
        backend: force the forward path: ``"torch"`` (the reference: dequantize, then matmul),
            ``"triton"`` (the Triton kernels) or ``"cpu"`` (torch's INT4 CPU kernel). Default: Triton on
            CUDA, ``"cpu"`` on CPU where torch has the kernel, else ``"torch"`` (see upq_hf/backends.py).
        mix: a named mixed-precision preset, resolved into ``module_bits`` patterns against the model's
            layer names when it is quantized (``"kv-edge"``: k/v and the edge blocks' down_proj at INT4, see
            :data:`MIXES`); patterns given in ``module_bits`` come first. INT2 only.
        module_bits: mixed precision, per-module overrides by name pattern: ``{pattern: bits}`` or
            ``{pattern: {"bits": b, "group_size": g}}``; a pattern is a regular expression searched in the
            layer's full name (``r"\.(k|v)_proj$"``, ``r"layers\.(0|29)\.mlp\.down_proj"``); the first
            pattern that matches decides, and a layer no pattern matches takes ``bits``/``group_size``. An
            override to INT4 without a group size takes ``int4_group_size``. Saved with the checkpoint, so a
            mixed model reloads with plain ``from_pretrained``.

    Data and PTQ (recipes ``ptq`` and ``upq``):
        dataset: calibration/training text: ``"self"`` (the model's own answers to built-in prompts,
            offline), a Hub dataset name, a local .txt/.jsonl/.parquet file or folder, or a list of strings.
        self_prompts: how many built-in prompts ``"self"`` answers (None: its default).
        nsamples, seqlen: calibration sequences for PTQ.
        ptq_algorithm, ptq_epochs: see :func:`upq_hf.ptq.blockwise_ptq`.
        int4_group_size: group size of the intermediate INT4 model (``upq``).
        int4_checkpoint: folder where ``upq`` keeps the INT4 model, and restarts from it if present.
        int2_ptq: reconstruct the INT2 model block-wise from the INT4 one before distilling.
        int2_scale_init: INT2 scale initialisation from the INT4 weights when ``int2_ptq`` is off: ``"max"``
            (ParetoQ's max |w|, the default: measured better than the ``"mse"`` search from the INT4 model of
            the bundled SmolLM2, KL 17.1 vs 18.4, see docs/BENCHMARKS.md) or ``"mse"``.

    Training (recipes ``upq``, ``ntp``, ``distill``):
        train_steps, train_batch_size, train_seqlen: the budget (tokens = their product). The defaults
            (30 x 16 x 128 = 61,440 tokens over 128 distinct sequences; PTQ calibration 128 x 128) are
            sized so that ``recipe="upq"``
            on the bundled SmolLM2-135M ends within 30 minutes on a 2-core CPU (docs/BENCHMARKS.md); a
            GPU run of a real model wants 10-1000x more.
        learning_rate, scale_learning_rate: of the latent weights, as the fraction of their quantization
            step they move per update, and of the scales (and trained norm weights), as their relative
            change per update (:class:`upq_hf.optim.StepAdam`: the same meaning in every layer and
            every model).
        beta, temperature: of the generalized JSD. ``beta=0`` (the default) is its forward-KL limit,
            KL(teacher || student): measured on the bundled model at 15k training tokens it gave KL 5.16
            against 6.23 / 6.61 / 6.73 at beta 0.1 / 0.25 / 0.5, top-1 0.123 against 0.139 / 0.140 /
            0.148 (docs/BENCHMARKS.md). A bounded JSD (beta > 0) gives almost no gradient on the tokens
            where the student puts next to no mass on the teacher's choice; forward KL does.
        train_norms: train the normalisation layers' weights along with the quantized layers.
        train_codes: ``upq`` only: whether Distill-QAT trains the latent weights (codes may flip) or, the
            default, keeps the INT2 reconstruction's codes fixed and trains the scales and norm weights alone
            (EfficientQAT's E2E-QP, with the generalized JSD to the teacher as its loss). On the bundled model,
            validation prompts: top-1 0.542 / KL 1.21 / 23 of 24 answers on topic with the codes fixed, against
            0.513 / 1.38 / 18 with them trained (docs/BENCHMARKS.md). ``ntp`` and ``distill`` train everything.
        e2e_qp_steps, e2e_qp_learning_rate: a last stage of ``upq`` after Distill-QAT, or of ``ptq`` after
            the block-wise reconstruction (EfficientQAT's E2E-QP, with the JSD to the unquantized model as its
            loss; ``ptq`` then keeps a copy of that model in memory): every layer's codes fixed, its scales
            (and, with ``train_norms``, the norm weights) trained for ``e2e_qp_steps`` more steps, at
            ``e2e_qp_learning_rate`` (relative change per update). 0 (the default): no such stage
            (docs/BENCHMARKS.md).
        work_dir: where trainer checkpoints go (resumable with ``resume=True``); None: not kept.
        device: where quantization runs (default: where the model is).
        seed: for data order and sampling.
    """

    def __init__(self, bits: int = 2, group_size: int | None = 64, recipe: str = "rtn",
                 scale_init: str = "mse", scale_dtype: str = "float16",
                 modules_to_not_convert: list[str] | None = None, backend: str | None = None,
                 module_bits: dict[str, Any] | None = None, mix: str | None = None,
                 format_version: int = FORMAT_VERSION, dataset: Any = "self", self_prompts: int | None = None,
                 nsamples: int = 128, seqlen: int = 128, ptq_algorithm: str = "blockap", ptq_epochs: int = 9,
                 ptq_batch_size: int = 8, ptq_loss: str = "token", ptq_holdout: float = 0.125,
                 int4_group_size: int | None = 64, int4_ptq_epochs: int = 1, int4_checkpoint: str | None = None,
                 int2_ptq: bool = True, int2_scale_init: str = "max", train_steps: int = 30,
                 train_batch_size: int = 16, train_seqlen: int = 128, train_samples: int | None = 128,
                 learning_rate: float = 0.02, scale_learning_rate: float | None = 1e-2,
                 beta: float = 0.0, temperature: float = 1.0, teacher_topk: int = 64, train_norms: bool = True,
                 mixed_precision: str = "auto", train_codes: bool = False, e2e_qp_steps: int = 0,
                 e2e_qp_learning_rate: float = 1e-2,
                 work_dir: str | None = None, resume: bool = False,
                 device: str | None = None, seed: int = 0, **kwargs: Any):
        kwargs.pop("quant_method", None)
        self.quant_method = "upq"
        self.bits = bits
        self.group_size = group_size
        self.recipe = recipe
        self.scale_init = scale_init
        self.scale_dtype = scale_dtype
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.backend = backend
        self.module_bits = _ordered_patterns(module_bits)
        self.mix = mix
        self.format_version = format_version
        self.dataset = dataset
        self.self_prompts = self_prompts
        self.nsamples = nsamples
        self.seqlen = seqlen
        self.ptq_algorithm = ptq_algorithm
        self.ptq_epochs = ptq_epochs
        self.ptq_batch_size = ptq_batch_size
        self.ptq_loss = ptq_loss
        self.ptq_holdout = ptq_holdout
        self.int4_ptq_epochs = int4_ptq_epochs
        self.int4_group_size = int4_group_size
        self.int4_checkpoint = int4_checkpoint
        self.int2_ptq = int2_ptq
        self.int2_scale_init = int2_scale_init
        self.train_steps = train_steps
        self.train_batch_size = train_batch_size
        self.train_seqlen = train_seqlen
        self.train_samples = train_samples
        self.teacher_topk = teacher_topk
        self.mixed_precision = mixed_precision
        self.learning_rate = learning_rate
        self.scale_learning_rate = scale_learning_rate
        self.beta = beta
        self.train_norms = train_norms
        self.train_codes = train_codes
        self.e2e_qp_steps = e2e_qp_steps
        self.e2e_qp_learning_rate = e2e_qp_learning_rate
        self.temperature = temperature
        self.work_dir = work_dir
        self.resume = resume
        self.device = device
        self.seed = seed
        # keys written by a newer version are kept (and saved back) rather than dropped
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        try:
            check_bits(self.bits)
        except ValueError as error:
            raise ValueError(f"UPQConfig: {error}") from None
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0
        ):
            raise ValueError(
                f"UPQConfig: group_size must be a positive integer (e.g. 32, 64, 128) or None for one scale "
                f"per output row, got {self.group_size!r}"
            )
        if self.recipe not in RECIPES:
            raise ValueError(f"UPQConfig: recipe must be one of {list(RECIPES)}, got {self.recipe!r}")
        if self.scale_init not in SCALE_INITS:
            raise ValueError(f"UPQConfig: scale_init must be one of {list(SCALE_INITS)}, got {self.scale_init!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"UPQConfig: scale_dtype must be one of {list(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"UPQConfig: backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        for name in ("nsamples", "seqlen", "ptq_epochs", "ptq_batch_size", "int4_ptq_epochs", "train_steps",
                     "train_batch_size", "train_seqlen"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"UPQConfig: {name} must be a positive integer, got {value!r}")
        if self.train_samples is not None and (not isinstance(self.train_samples, int)
                                               or isinstance(self.train_samples, bool) or self.train_samples <= 0):
            raise ValueError(f"UPQConfig: train_samples must be a positive integer or None, got {self.train_samples!r}")
        if self.ptq_loss not in PTQ_LOSSES:
            raise ValueError(f"UPQConfig: ptq_loss must be one of {list(PTQ_LOSSES)}, got {self.ptq_loss!r}")
        if not isinstance(self.ptq_holdout, (int, float)) or isinstance(self.ptq_holdout, bool) \
                or not 0.0 <= self.ptq_holdout < 1.0:
            raise ValueError(f"UPQConfig: ptq_holdout is the share of calibration sequences held out, in [0, 1), "
                             f"got {self.ptq_holdout!r}")
        if not isinstance(self.teacher_topk, int) or isinstance(self.teacher_topk, bool) or self.teacher_topk < 0:
            raise ValueError(f"UPQConfig: teacher_topk must be a non-negative integer (0: run the teacher while "
                             f"training), got {self.teacher_topk!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"UPQConfig: mixed_precision must be one of {list(MIXED_PRECISIONS)}, "
                             f"got {self.mixed_precision!r}")
        if not 0.0 <= float(self.beta) <= 1.0:
            raise ValueError(f"UPQConfig: beta must lie in [0, 1], got {self.beta!r}")
        if float(self.temperature) <= 0:
            raise ValueError(f"UPQConfig: temperature must be positive, got {self.temperature!r}")
        if not isinstance(self.train_codes, bool):
            raise ValueError(f"UPQConfig: train_codes must be True or False, got {self.train_codes!r}")
        if not isinstance(self.e2e_qp_steps, int) or isinstance(self.e2e_qp_steps, bool) or self.e2e_qp_steps < 0:
            raise ValueError(f"UPQConfig: e2e_qp_steps must be a non-negative integer, got {self.e2e_qp_steps!r}")
        if self.e2e_qp_steps and self.recipe not in ("upq", "ptq"):
            raise ValueError(f"UPQConfig: e2e_qp_steps is a last stage of the 'upq' and 'ptq' recipes, not of "
                             f"{self.recipe!r}")
        if not isinstance(self.e2e_qp_learning_rate, (int, float)) or isinstance(self.e2e_qp_learning_rate, bool) \
                or not self.e2e_qp_learning_rate > 0:
            raise ValueError(f"UPQConfig: e2e_qp_learning_rate must be positive, got {self.e2e_qp_learning_rate!r}")
        if self.int2_scale_init not in SCALE_INITS:
            raise ValueError(f"UPQConfig: int2_scale_init must be one of {list(SCALE_INITS)}, got {self.int2_scale_init!r}")
        self._check_module_bits()
        if self.mix is not None:
            if self.mix not in MIXES:
                raise ValueError(f"UPQConfig: mix must be one of {list(MIXES)} or None, got {self.mix!r}")
            if self.bits != 2:
                raise ValueError(f"UPQConfig: mix {self.mix!r} keeps some INT2 layers at INT4 and needs bits=2, "
                                 f"got bits={self.bits}")
        if not isinstance(self.format_version, int) or self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses UPQ storage format version {self.format_version!r}, but the installed "
                f"upq_hf reads versions up to {FORMAT_VERSION}: upgrade upq_hf (pip install -U upq_hf)"
            )

    def _check_module_bits(self) -> None:
        if self.module_bits is None:
            return
        if not isinstance(self.module_bits, dict):
            raise ValueError(f"UPQConfig: module_bits must map name patterns to bits, got {self.module_bits!r}")
        for pattern, spec in self.module_bits.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(f"UPQConfig: module_bits pattern {pattern!r} is not a regular expression: {error}") \
                    from None
            bits, group_size = self._override(spec)
            try:
                check_bits(bits)
            except ValueError as error:
                raise ValueError(f"UPQConfig: module_bits[{pattern!r}]: {error}") from None
            if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool)
                                           or group_size <= 0):
                raise ValueError(f"UPQConfig: module_bits[{pattern!r}]: group_size must be a positive integer or "
                                 f"None, got {group_size!r}")

    def _override(self, spec) -> tuple[Any, Any]:
        if isinstance(spec, dict):
            unknown = set(spec) - {"bits", "group_size"}
            if unknown or "bits" not in spec:
                raise ValueError(f"UPQConfig: a module_bits entry is bits or {{'bits': b, 'group_size': g}}, got {spec!r}")
            bits = spec["bits"]
            default = self.group_size if bits == self.bits else self.int4_group_size
            return bits, spec.get("group_size", default)
        bits = spec
        return bits, self.group_size if bits == self.bits else self.int4_group_size

    def layer_format(self, name: str, aliases: tuple[str, ...] = ()) -> tuple[int, int | None]:
        """``(bits, group_size)`` of the quantized layer called ``name`` (see ``module_bits``); a pattern may
        also match one of ``aliases`` (a role of a fused projection answers to its layer's name too)."""
        for pattern, spec in (self.module_bits or {}).items():
            if any(re.search(pattern, n) for n in (name, *aliases)):
                return self._override(spec)
        return self.bits, self.group_size

    def layer_formats(self, layers) -> dict[str, tuple[int, int | None]]:
        """``{name: (bits, group_size)}`` for the layers among ``layers`` (names, ``{name: module}`` or
        ``{name: upq_hf.adapters.Unit}``) that ``module_bits`` sets apart; raises if a pattern matches none of them
        (a typo would otherwise quantize everything at ``bits``)."""
        names = list(layers)
        aliases = {name: tuple(n for n in getattr(layers[name], "names", ()) if n != name)
                   for name in names} if hasattr(layers, "items") else {}
        self.resolve_mix(layers)
        for pattern in self.module_bits or {}:
            if not any(re.search(pattern, n) for name in names for n in (name, *aliases.get(name, ()))):
                example = names[0] if names else "(none)"
                raise ValueError(f"UPQConfig: module_bits pattern {pattern!r} matches none of the {len(names)} layers "
                                 f"to quantize (their names look like {example!r})")
        return {name: fmt for name in names
                if (fmt := self.layer_format(name, aliases.get(name, ()))) != (self.bits, self.group_size)}

    @property
    def sets_layers_apart(self) -> bool:
        """Whether some layers may take another format than ``bits``/``group_size`` (``module_bits`` or ``mix``):
        when not, there is nothing to resolve against the model's layers."""
        return bool(self.module_bits or self.mix)

    def resolve_mix(self, layers) -> None:
        """Add ``mix``'s patterns for ``layers`` (names, or ``{name: module}``) to ``module_bits``, after the
        patterns given there (which so take precedence). Idempotent: the saved config holds the resolved patterns
        and the mix's name, and resolving again on reload adds nothing."""
        if not self.mix:
            return
        # the patterns this config's last resolution added are dropped first, so that one config object can
        # quantize models of different depths, each with its own edge blocks
        added = self.__dict__.get("_mix_patterns", ())
        given = {p: b for p, b in (self.module_bits or {}).items() if p not in added}
        scale_bytes = 4 if self.scale_dtype == "float32" else 2
        new = {p: b for p, b in mix_module_bits(self.mix, layers, self.bits, self.group_size, self.int4_group_size,
                                                scale_bytes).items() if p not in given}
        self.module_bits = {**given, **new}
        self._mix_patterns = tuple(new)

    @property
    def torch_scale_dtype(self):
        import torch

        return getattr(torch, self.scale_dtype)

    def check_device(self) -> None:
        """A GPU-only option (``device="cuda"``, ``backend="triton"``) on a machine without a GPU: say so before
        any work starts."""
        from .models import check_backend, check_device

        check_device(self.device, f"UPQConfig(device={self.device!r})", "use device='cpu' or leave it unset")
        check_backend(self.backend, f"UPQConfig(backend={self.backend!r})", "leave backend unset (torch)")

    def to_dict(self) -> dict[str, Any]:
        out = {key: value for key, value in self.__dict__.items() if not key.startswith("_")}
        if not isinstance(out.get("dataset"), (str, type(None))):  # texts passed in memory: record a summary
            out["dataset"] = f"<{len(out['dataset'])} texts given in memory>"
        if isinstance(out.get("module_bits"), dict):  # ordered pairs: config.json sorts the keys of a dict
            out["module_bits"] = [[pattern, spec] for pattern, spec in out["module_bits"].items()]
        return out
