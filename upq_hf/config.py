"""``UPQConfig``: what a UPQ checkpoint is, and which recipe makes it (validation and defaults, nothing else).

It is a ``transformers`` ``QuantizationConfigMixin`` so that it rides in ``config.json`` under
``quantization_config`` and is rebuilt by ``from_pretrained``; every attribute is JSON-serialisable. The fields
are the format (what reading the checkpoint back needs: bits, group size, per-module formats or a named mix, scale
dtype, the layers kept dense, the backend, the storage format version), the recipe's name, its seed, and one small
config per stage the recipe runs (:mod:`upq_hf.stages`), recorded in ``config.json`` under ``stages`` for the model
card. Where to run and where to keep scratch files (device, work folder, resume, the INT4 stage's restart state)
are arguments of :func:`upq_hf.quantize_model` and of ``upq quantize``, never saved.
"""

from __future__ import annotations

import re
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from . import backends
from .formats import Q2_K_GROUP, SCALE_GRIDS, check_bits
from .packing import FORMAT_VERSION
from .recipes import RECIPES
from .rotation import ROTATIONS
from .stages import BUDGETS, STAGES, as_dict, stage_config

SCALE_DTYPES = ("float16", "bfloat16", "float32")
BACKENDS = (None, *backends.BACKENDS)
# Named mixes: module_bits patterns made from a model's own layer names (see mix_module_bits)
MIXES = {
    "kv4": "attention k and v projections at INT4 in every block (found by role: k_proj/v_proj, or the k and v rows "
           "of a fused qkv), paid for by wider groups in the other layers: their group size is the smallest multiple "
           "of group_size that keeps the model's average bits per weight at what uniform INT2 at group_size costs "
           "(2.25 with group_size=64; on the bundled model: group 192)",
}
#: mixes that are no longer offered: a checkpoint made with one still loads (its resolved patterns are saved in
#: ``module_bits``). ``kv-edge`` (k/v and the edge blocks' down_proj at INT4) measured no better than ``kv4``,
#: at more bits per weight (docs/BENCHMARKS.md).
RETIRED_MIXES = ("kv-edge",)
#: ``mix="auto"``, the default: ``kv4`` for the ``upq`` recipe at INT2, where it was measured far ahead of uniform
#: INT2 at the same size (docs/BENCHMARKS.md); no mix otherwise
AUTO_MIX = "kv4"
_KV = r"\.(k|v)_proj$"  # a k or v projection, unfused or a role of a fused one (upq_hf.adapters)

#: the flat keys of upq_hf 0.1's UPQConfig, read into the stage configs (config.json of older checkpoints)
LEGACY_KEYS = {
    "scale_init": ("rtn", "scale_init"), "dataset": ("data", "dataset"), "self_prompts": ("data", "prompts"),
    "nsamples": ("data", "calibration_samples"), "seqlen": ("data", "calibration_seqlen"),
    "ptq_epochs": ("ptq", "epochs"), "int4_ptq_epochs": ("ptq", "int4_epochs"),
    "ptq_batch_size": ("ptq", "batch_size"), "ptq_holdout": ("ptq", "holdout"),
    "train_steps": ("distill", "steps"), "train_batch_size": ("distill", "batch_size"),
    "train_seqlen": ("distill", "seqlen"), "train_samples": ("distill", "samples"),
    "learning_rate": ("distill", "learning_rate"), "scale_learning_rate": ("distill", "scale_learning_rate"),
    "beta": ("distill", "beta"), "temperature": ("distill", "temperature"), "teacher_topk": ("distill", "teacher_topk"),
    "train_norms": ("distill", "train_norms"), "mixed_precision": ("distill", "mixed_precision"),
    "e2e_qp_steps": ("e2e_qp", "steps"), "e2e_qp_learning_rate": ("e2e_qp", "learning_rate"),
}
#: keys of upq_hf 0.1 that name no setting any more: options measured and not adopted (one way is left), and the
#: per-run settings, now arguments of quantize_model. Read from an older config.json and dropped.
RETIRED_KEYS = {
    "ptq_algorithm": "block-wise PTQ is Block-AP (learnable clipping measured worse)",
    "ptq_loss": "the reconstruction error is the token-relative one (plain and per-channel MSE measured worse)",
    "int2_ptq": "upq always reconstructs the INT2 model block-wise (starting from the INT4 scales measured worse)",
    "int2_scale_init": "upq always reconstructs the INT2 model block-wise",
    "train_codes": "upq's Distill-QAT keeps the reconstruction's codes (training them measured worse)",
    "device": "an argument of quantize_model / upq quantize --device",
    "work_dir": "an argument of quantize_model / upq quantize --work-dir",
    "resume": "an argument of quantize_model / upq quantize --resume",
    "int4_checkpoint": "an argument of quantize_model (keep_int4) / upq quantize --keep-int4",
}


def budget(name: str, recipe: str | None = None) -> dict[str, dict]:
    """The stage settings of the named budget (:data:`upq_hf.stages.BUDGETS`) as ``UPQConfig`` keyword arguments,
    limited to the stages ``recipe`` runs when given: ``UPQConfig(recipe="upq", **budget("demo", "upq"))``."""
    if name not in BUDGETS:
        raise ValueError(f"budget must be one of {list(BUDGETS)}, got {name!r}")
    stages = RECIPES[recipe].stages if recipe in RECIPES else STAGES
    return {stage: dict(fields) for stage, fields in BUDGETS[name].items() if stage in stages}


def mix_module_bits(mix: str, layers, bits: int = 2, group_size: int | None = 64, int4_group_size: int | None = 64,
                    scale_bytes: int = 2) -> dict[str, Any]:
    """The ``module_bits`` patterns of the named mix ``mix`` (a key of :data:`MIXES`) for a model whose
    quantized layers are ``layers`` (``{name: module or upq_hf.adapters.Unit}`` with ``in_features`` and
    ``out_features``, which ``"kv4"`` needs to hold its bit budget). Raises ``ValueError`` for a model whose
    layers the mix cannot place (no k or v projection)."""
    if mix not in MIXES:
        raise ValueError(f"UPQConfig: mix must be one of {list(MIXES)}, got {mix!r}")
    names = list(layers)
    kv = [n for n in names if re.search(_KV, n)]
    if not kv:
        example = names[0] if names else "(none)"
        raise ValueError(f"UPQConfig: mix {mix!r} places k and v projections ('...k_proj', '...v_proj', or the k and "
                         f"v rows of a fused qkv), and this model's layers look like {example!r}: give module_bits "
                         f"patterns for it instead")
    if not hasattr(layers, "items"):
        raise ValueError("UPQConfig: mix 'kv4' needs the layers' shapes to hold its bit budget: pass "
                         "{name: module}, not names")
    shapes = {name: (module.in_features, module.out_features) for name, module in layers.items()}
    group = budget_group_size(shapes, set(kv), bits, group_size, int4_group_size, scale_bytes)
    return {_KV: 4, **({".": {"bits": bits, "group_size": group}} if group != group_size else {})}


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
    r"""Configuration of a UPQ quantization: the format of the checkpoint, and the recipe that makes it.

    Format (what reading the checkpoint back needs):
        bits: 2 (SEQ INT2, four levels ``(k - 1.5) * s``) or 4 (asymmetric INT4).
        group_size: input columns sharing one scale; ``None`` for one scale per output row.
        mix: a named mixed-precision preset (:data:`MIXES`), resolved into ``module_bits`` patterns against the
            model's layers when it is quantized; ``"auto"`` (the default): ``kv4`` for the ``upq`` recipe at INT2,
            none otherwise; ``None``: uniform ``bits``. INT2 only.
        module_bits: per-module formats by name pattern: ``{pattern: bits}`` or ``{pattern: {"bits": b,
            "group_size": g}}``; a pattern is a regular expression searched in the layer's full name (a role of a
            fused projection answers to ``<layer>.<role>`` and to its layer's name); the first pattern that matches
            decides; patterns given here come before the mix's.
        int4_group_size: the group size of INT4 layers that ``module_bits``/``mix`` name without one, and of
            ``upq``'s INT4 stage.
        scale_grid: ``"q2_k"``: the INT2 layers' scales live on llama.cpp's Q2_K grid (groups of 16 columns, each
            scale an integer multiple 1..15 of one fp16 step per 256 columns), and every stage trains on it, so that
            ``upq export --gguf`` writes the trained layers as ``Q2_K`` (2.625 bits per weight) exactly. Needs
            ``bits=2``, ``group_size=16``, ``scale_dtype="float16"`` and rows that are multiples of 256.
        scale_dtype: storage dtype of scales and zero points.
        modules_to_not_convert: module names (or name suffixes) kept in high precision; the output and tied
            embeddings and the MoE routers always are.
        backend: force the forward path (upq_hf/backends.py): ``"torch"``, ``"triton"``, ``"cpu"``, ``"avx2"`` or
            ``"a8"``; default: the fastest exact one for the device and call.
        format_version: the storage format (upq_hf/packing.py), set when the model is quantized.

    Recipe:
        recipe: a name in :data:`upq_hf.recipes.RECIPES`: ``"rtn"`` (round to nearest), ``"ptq"`` (block-wise PTQ),
            ``"upq"`` (block-wise INT2 PTQ, from an INT4 stage if ``ptq.int4_epochs`` > 0, then Distill-QAT of the
            scales), ``"ntp"`` (INT2 next-token QAT, ParetoQ's recipe: a baseline) or ``"distill"`` (INT2
            Distill-QAT from the dense weights: a baseline).
        rtn, data, ptq, distill, e2e_qp: the configs of the recipe's stages (:mod:`upq_hf.stages`), each a
            dataclass or a dict of its fields; a stage the recipe does not run cannot be set. ``stages``: all of
            them as one dict (what config.json holds).
        seed: for the data, its order and the training (and the rotation's signs).
        rotation: ``"hadamard"``: before any stage, turn the residual stream by a Hadamard matrix with random signs
            fused into the weights (:mod:`upq_hf.rotation`, QuaRot/SpinQuant's R1): the same function, weights that
            quantize better; the checkpoint is a plain one of its family (norm weights of one, the head untied).
            Pre-norm RMSNorm families without experts; needs the dense model in memory. ``"auto"``: the Hadamard
            rotation where the recipe is ``upq`` at INT2 on the default scale grid, the model can be rotated
            (:func:`upq_hf.rotation.rotation_problem`) and is quantized in memory, where it was measured ahead
            (docs/BENCHMARKS.md); no rotation elsewhere, with a line saying why. It is resolved when the model is
            quantized: the saved config says what was done; the default. None: no rotation (also what a saved
            config.json without the key reads as: checkpoints from before the rotation were not turned).
    """

    def __init__(self, bits: int = 2, group_size: int | None = 64, recipe: str = "rtn", mix: str | None = "auto",
                 module_bits: dict[str, Any] | None = None, int4_group_size: int | None = 64,
                 scale_dtype: str = "float16", modules_to_not_convert: list[str] | None = None,
                 backend: str | None = None, scale_grid: str | None = None, format_version: int = FORMAT_VERSION,
                 seed: int = 0, rotation: str | None = "auto", rtn=None,
                 data=None, ptq=None, distill=None, e2e_qp=None, stages: dict | None = None, **kwargs: Any):
        kwargs.pop("quant_method", None)
        self.quant_method = "upq"
        self.bits = bits
        self.group_size = group_size
        self.recipe = recipe
        self.mix = mix
        self.module_bits = _ordered_patterns(module_bits)
        self.int4_group_size = int4_group_size
        self.scale_dtype = scale_dtype
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.backend = backend
        self.scale_grid = scale_grid
        self.format_version = format_version
        self.seed = seed
        self.rotation = rotation
        reading = kwargs.pop("_reading", False)  # from_dict: a saved config.json, maybe of an older upq_hf
        given = dict(stages or {})
        for name, value in (("rtn", rtn), ("data", data), ("ptq", ptq), ("distill", distill), ("e2e_qp", e2e_qp)):
            if value is not None:
                given[name] = value
        self._given_stages = tuple(given)
        for key in [k for k in kwargs if k in LEGACY_KEYS]:
            stage, field = LEGACY_KEYS[key]
            if not reading:
                raise ValueError(f"UPQConfig: {key} is now {STAGES[stage].__name__}.{field}: "
                                 f"UPQConfig({stage}={{{field!r}: ...}})")
            value = kwargs.pop(key)
            if isinstance(given.get(stage, {}), dict):  # an older config.json's flat keys fill the stages
                given.setdefault(stage, {})[field] = value
        for key in [k for k in kwargs if k in RETIRED_KEYS]:
            if not reading:
                raise ValueError(f"UPQConfig: {key} is no longer a setting: {RETIRED_KEYS[key]}")
            kwargs.pop(key)
        for name in STAGES:
            setattr(self, name, stage_config(name, given.get(name), strict=not reading))
        if kwargs and not reading:
            raise TypeError(f"UPQConfig got an unexpected keyword argument {next(iter(kwargs))!r}")
        for key, value in kwargs.items():  # keys written by a newer version are kept (and saved back)
            setattr(self, key, value)
        self.post_init()

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """A config saved in config.json (any version): the flat keys of upq_hf 0.1 are read into the stages,
        its retired settings dropped, and keys of a newer version kept. A config without ``rotation`` was written
        before the rotation existed: it reads as None, not as today's ``"auto"``."""
        return super().from_dict({"rotation": None, **config_dict, "_reading": True}, return_unused_kwargs, **kwargs)

    @property
    def auto_applies(self) -> bool:
        """Whether the ``"auto"`` settings (``mix``, ``rotation``) take effect: recipe ``upq`` at INT2 on the
        default scale grid, the setting they were measured ahead in."""
        return self.recipe == "upq" and self.bits == 2 and self.scale_grid is None

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The stages the recipe runs (:data:`upq_hf.recipes.RECIPES`), in order."""
        return RECIPES[self.recipe].stages

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
        unused = [name for name in self._given_stages if name not in self.stage_names]
        if unused:
            raise ValueError(f"UPQConfig: recipe {self.recipe!r} runs no {unused[0]!r} stage (its stages: "
                             f"{list(self.stage_names)})")
        if self.e2e_qp.steps and "e2e_qp" not in self.stage_names:
            raise ValueError(f"UPQConfig: E2E-QP is a last stage of the 'upq' and 'ptq' recipes, not of "
                             f"{self.recipe!r}")
        if self.distill.sampled_answers and self.data.dataset != "self":
            raise ValueError(f"UPQConfig: distill.sampled_answers samples the teacher's answers to the built-in "
                             f"prompts and needs data.dataset 'self', got {self.data.dataset!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"UPQConfig: scale_dtype must be one of {list(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"UPQConfig: backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"UPQConfig: seed must be an integer, got {self.seed!r}")
        if self.rotation is not None and self.rotation not in (*ROTATIONS, "auto"):
            raise ValueError(f"UPQConfig: rotation must be one of {list(ROTATIONS)}, 'auto' or None, got "
                             f"{self.rotation!r}")
        if self.rotation == "auto" and not self.auto_applies:
            self.rotation = None
        self._check_module_bits()
        if self.mix == "auto":
            self.mix = AUTO_MIX if self.auto_applies else None
        if self.scale_grid is not None:
            if self.scale_grid not in SCALE_GRIDS:
                raise ValueError(f"UPQConfig: scale_grid must be one of {list(SCALE_GRIDS)} or None, got "
                                 f"{self.scale_grid!r}")
            if (self.bits, self.group_size, self.scale_dtype, self.mix) != (2, Q2_K_GROUP, "float16", None):
                raise ValueError(f"UPQConfig: scale_grid {self.scale_grid!r} is a grid of INT2 scales per 16 columns in "
                                 f"fp16: it needs bits=2, group_size=16, scale_dtype='float16' and no mix, got "
                                 f"bits={self.bits}, group_size={self.group_size}, scale_dtype={self.scale_dtype!r}, "
                                 f"mix={self.mix!r}")
        if self.mix is not None:
            if self.mix in RETIRED_MIXES:
                if not self.module_bits:
                    raise ValueError(f"UPQConfig: mix {self.mix!r} is retired ({', '.join(MIXES)} is offered): give "
                                     f"module_bits patterns for it instead")
            elif self.mix not in MIXES:
                raise ValueError(f"UPQConfig: mix must be one of {list(MIXES)}, 'auto' or None, got {self.mix!r}")
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
        if not self.mix or self.mix in RETIRED_MIXES:  # a retired mix's patterns are in module_bits already
            return
        # the patterns this config's last resolution added are dropped first, so that one config object can
        # quantize models of different shapes
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

    def check_backend(self) -> None:
        """A GPU-only backend (``backend="triton"``) on a machine without a GPU: say so before any work starts."""
        from .models import check_backend

        check_backend(self.backend, f"UPQConfig(backend={self.backend!r})", "leave backend unset (torch)")

    def stages_dict(self) -> dict[str, dict]:
        """The configs of the stages the recipe runs, as dicts (what config.json records under ``stages``)."""
        return {name: as_dict(getattr(self, name)) for name in self.stage_names}

    def to_dict(self) -> dict[str, Any]:
        out = {key: value for key, value in self.__dict__.items() if not key.startswith("_") and key not in STAGES}
        if isinstance(out.get("module_bits"), dict):  # ordered pairs: config.json sorts the keys of a dict
            out["module_bits"] = [[pattern, spec] for pattern, spec in out["module_bits"].items()]
        out["stages"] = self.stages_dict()
        return out
