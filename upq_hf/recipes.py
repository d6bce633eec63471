"""Recipes: the ways of turning a dense model into a UPQ model, as compositions of the stages.

* ``rtn``: round to nearest (no data).
* ``ptq``: block-wise PTQ (:mod:`upq_hf.ptq`) at ``bits``, optionally followed by E2E-QP.
* ``upq``: block-wise INT2 reconstruction (from the unquantized weights by default; with ``ptq.int4_epochs`` > 0
  from the latent weights of a block-wise INT4 stage first, the paper's progression, which measured worse on the
  bundled model); the codes fixed there and the scales (and norm weights) distilled from the unquantized teacher
  with the generalized JSD (Distill-QAT); optionally E2E-QP; packed once at the end.
* ``ntp``: INT2 QAT from the unquantized weights with next-token cross-entropy (ParetoQ's recipe; a baseline).
* ``distill``: INT2 Distill-QAT (JSD) from the unquantized weights, no INT4 stage (a baseline).

:data:`RECIPES` maps each name to its function, a one-line description and the stages it runs
(:mod:`upq_hf.stages`): ``UPQConfig``'s valid recipes and stage configs, the CLI's ``--recipe`` choices and the
model card read it. A recipe quantizes the model in place: ``recipe(model, config, run)``, ``run`` the
per-run settings (:class:`Run`: tokenizer, device, work folder, resume, where ``upq`` keeps its INT4 stage).
Data (``DataConfig.dataset``) comes from :mod:`upq_hf.data`; the default ``"self"`` is the teacher's own answers
to built-in prompts, so every recipe runs offline and uses no private data.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import convert


@dataclass(frozen=True)
class Recipe:
    """A registered recipe: ``apply(model, config, run)`` quantizes ``model`` in place; ``stages``: the stage
    configs it reads (:data:`upq_hf.stages.STAGES`); ``trains``: it runs (Distill-)QAT."""

    name: str
    apply: Callable[..., nn.Module]
    description: str
    stages: tuple[str, ...]
    trains: bool = False


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, description: str, stages: tuple[str, ...], trains: bool = False):
    """Decorator: add a recipe function to :data:`RECIPES` under ``name``."""

    def decorate(function):
        RECIPES[name] = Recipe(name, function, description, stages, trains)
        return function

    return decorate


@dataclass
class Run:
    """What one quantization run needs besides its ``UPQConfig``, and never saves: the tokenizer (default: the
    model's own), where the work runs (default: where the model is), where trainer checkpoints go (``work_dir``;
    None: a temporary folder, not kept) and whether to continue from the last one (``resume``), where ``upq``
    keeps its INT4 stage's state (``keep_int4``: a later run with the same settings restarts from it), progress
    bars, and ``transformers.TrainerCallback`` objects for the training stages."""

    tokenizer: Any = None
    device: str | torch.device | None = None
    work_dir: str | None = None
    resume: bool = False
    keep_int4: str | None = None
    progress: bool = False
    callbacks: list | None = None


def _log(message: str) -> None:
    import sys

    print(f"[upq] {message}", file=sys.stderr, flush=True)


def _device(run: Run, model: nn.Module) -> torch.device:
    return torch.device(run.device) if run.device else next(model.parameters()).device


def _calibration(model, tokenizer, config) -> torch.Tensor:
    from .data import calibration_data

    data = config.data
    return calibration_data(data.dataset, tokenizer, model=model, nsamples=data.calibration_samples,
                            seqlen=data.calibration_seqlen, seed=config.seed, **_self_kwargs(config))


def _self_kwargs(config) -> dict:
    """``calibration_data``'s keywords from ``config.data`` beyond the sizes: the "self" prompts' count."""
    return {"n_prompts": config.data.prompts} if config.data.dataset == "self" and config.data.prompts else {}


def ptq_options(model, config, run: Run, bits: int) -> dict:
    """The keyword arguments of :func:`upq_hf.ptq.blockwise_ptq` that ``config`` and ``run`` set."""
    from .models import autocast_dtype

    device = _device(run, model)
    return dict(scale_init=config.rtn.scale_init, scale_dtype=config.torch_scale_dtype,
                modules_to_not_convert=config.modules_to_not_convert, device=device, backend=config.backend,
                seed=config.seed, progress=run.progress, autocast=autocast_dtype(device, config.distill.mixed_precision),
                scale_grid=config.scale_grid if bits == 2 else None)


def _ptq(model, calibration, config, run: Run, bits: int, group_size, ptq=None, **options):
    from .ptq import blockwise_ptq

    report = blockwise_ptq(model, calibration, bits, group_size, ptq or config.ptq,
                           **ptq_options(model, config, run, bits), **options)
    _log(str(report).splitlines()[0] if str(report) else "PTQ done")
    return report


def warmup_steps(steps: int, share: float) -> int:
    """The steps of the learning rates' linear warm-up: ``share`` of ``steps``, at least one."""
    return max(1, int(steps * share))


def _train(student, teacher, tokenizer, config, run: Run, objective: str, dataset=None, stage: str = "trainer",
           steps: int | None = None, scale_learning_rate: float | None = None):
    """Distill-QAT (or next-token QAT) of a student whose quantized layers are ``QATLinear``, with
    ``config.distill``'s budget and loss (``steps``/``scale_learning_rate`` override it: E2E-QP). ``teacher`` is the
    unquantized model: the source of ``"self"`` data for every objective, the target for ``jsd``. ``dataset``: a
    training set built by an earlier call (its ``trainer.train_dataset``) instead of a new one; ``stage``: the
    folder under ``run.work_dir`` for this call's trainer checkpoints."""
    from transformers import TrainingArguments

    from .data import TokenBlockDataset
    from .distill import UPQDistillTrainer, select_trainable
    from .models import autocast_dtype

    distill = config.distill
    steps = steps or distill.steps
    nsamples = distill.samples or distill.steps * distill.batch_size
    if dataset is None:
        extra = {"sampled": distill.sampled_answers} if distill.sampled_answers else {}  # "self" data (UPQConfig)
        dataset = TokenBlockDataset.from_source(config.data.dataset, tokenizer, model=teacher, nsamples=nsamples,
                                                seqlen=distill.seqlen, seed=config.seed + 1,
                                                **_self_kwargs(config), **extra)
    else:
        nsamples = len(dataset)
    if objective == "jsd" and distill.teacher_topk and not getattr(dataset, "has_teacher", False):
        from .distill import TeacherTargetsDataset

        started = time.time()
        dataset = TeacherTargetsDataset.build(dataset, teacher, k=distill.teacher_topk,
                                              temperature=distill.temperature, progress=run.progress)
        _log(f"cached the teacher's top-{distill.teacher_topk} distributions on {nsamples} x {distill.seqlen} "
             f"tokens in {time.time() - started:.0f} s")
    trainable = select_trainable(student, train_norms=distill.train_norms, train_head=distill.head_learning_rate > 0)
    save = bool(run.work_dir)
    scratch = None if save else tempfile.mkdtemp(prefix="upq-train-")  # the Trainer wants a folder; removed below
    device = _device(run, student)
    bf16 = autocast_dtype(device, distill.mixed_precision) is not None
    args = TrainingArguments(
        output_dir=os.path.join(run.work_dir or scratch, stage), max_steps=steps,
        per_device_train_batch_size=distill.batch_size, learning_rate=distill.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=warmup_steps(steps, distill.warmup), weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=max(1, steps // 20), report_to=[], seed=config.seed, save_strategy="steps" if save else "no",
        save_steps=max(1, steps // 4), save_total_limit=2, use_cpu=device.type == "cpu", disable_tqdm=not run.progress,
        dataloader_num_workers=0, remove_unused_columns=False, bf16=bf16,
    )
    live_teacher = objective == "jsd" and not getattr(dataset, "has_teacher", False)
    trainer = UPQDistillTrainer(model=student, teacher_model=teacher if live_teacher else None, args=args,
                                train_dataset=dataset, objective=objective, beta=distill.beta,
                                temperature=distill.temperature, callbacks=run.callbacks,
                                scale_learning_rate=scale_learning_rate or distill.scale_learning_rate,
                                head_learning_rate=distill.head_learning_rate or None)
    _log(f"{objective} QAT: {trainable:,} trainable parameters, {steps} steps x {distill.batch_size} x "
         f"{distill.seqlen} tokens ({nsamples} distinct sequences{', bf16 autocast' if bf16 else ''})")
    resume = None
    if save and run.resume:
        from .resume import last_complete_checkpoint  # not get_last_checkpoint: a killed save leaves a partial one

        resume = last_complete_checkpoint(args.output_dir)
        _log(f"resuming from {resume}" if resume else
             f"nothing to resume in {args.output_dir} (no complete trainer checkpoint): training from the start")
    started = time.time()
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    # mixed precision wrapped the model's forward in autocast: the quantized model must not keep that wrapper
    trainer.accelerator.unwrap_model(student, keep_fp32_wrapper=False)
    elapsed = time.time() - started
    _log(f"trained in {elapsed:.0f} s ({steps * distill.batch_size * distill.seqlen / max(elapsed, 1e-9):.0f} "
         f"tokens/s)")
    student.requires_grad_(False)
    return trainer


def apply_recipe(model: nn.Module, config, run: Run | None = None) -> nn.Module:
    """Quantize ``model`` in place following ``config.recipe`` (a ``UPQConfig``) with the per-run settings ``run``;
    returns the model, in the mode (training or not) it came in."""
    from .models import check_device

    run = run or Run()
    recipe = RECIPES.get(config.recipe)
    if recipe is None:
        raise ValueError(f"unknown recipe {config.recipe!r}: one of {list(RECIPES)}")
    check_device(run.device, f"quantize_model(device={str(run.device)!r})", "use device='cpu' or leave it unset")
    config.check_backend()
    was_training = model.training
    from .rotation import resolve, rotate_residual

    rotation, declined = resolve(model, config)
    if declined:
        _log(f"rotation auto: the residual stream stays unrotated ({declined})")
    if rotation:
        rotate_residual(model, seed=config.seed)
        _log(f"rotated the residual stream ({rotation}, seed {config.seed}) into the weights")
    recipe.apply(model, config, run)
    convert.check_quantized(model, config)
    return model.train(was_training)  # training recipes leave the model in training mode (dropout on)


def _prepared(model: nn.Module, config, run: Run):
    """The model made canonical and every layer checked before any is touched (:func:`upq_hf.convert.prepare`);
    the tokenizer for the data; the model in eval mode."""
    from .models import load_tokenizer

    convert.prepare(model, config)
    model.eval()
    return run.tokenizer or load_tokenizer(getattr(model, "name_or_path", None) or model.config._name_or_path)


def _teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of the dense model, in its family's layout (its own experts implementation), before
    :func:`upq_hf.convert.prepare` rewrites the model."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def _int2_start(model: nn.Module, config, run: Run):
    """The INT2 recipes' start: a frozen copy of the model as the teacher, and the prepared model's tokenizer."""
    if config.bits != 2:
        raise ValueError(f"recipe {config.recipe!r} produces INT2: use bits=2 (or recipe='ptq' for INT4)")
    teacher = _teacher(model)
    return _prepared(model, config, run), teacher


@register_recipe("rtn", "round to nearest (no data)", stages=("rtn",))
def rtn(model: nn.Module, config, run: Run) -> nn.Module:
    convert.quantize_linears_rtn(model, config.bits, config.group_size, config.rtn.scale_init,
                                 config.torch_scale_dtype, config.modules_to_not_convert, config.backend,
                                 progress=run.progress, layer_formats=convert.prepare(model, config),
                                 scale_grid=config.scale_grid)
    return model


@register_recipe("ptq", "block-wise PTQ at `bits`", stages=("rtn", "data", "ptq", "distill", "e2e_qp"))
def ptq(model: nn.Module, config, run: Run) -> nn.Module:
    from .qat import freeze_model

    # with E2E-QP, EfficientQAT's two stages: block-wise PTQ, then the scales distilled from the dense model
    teacher = _teacher(model) if config.e2e_qp.steps else None
    tokenizer = _prepared(model, config, run)
    _ptq(model, _calibration(model, tokenizer, config), config, run, config.bits, config.group_size,
         layer_formats=convert.model_layer_formats(model, config), keep_qat=True)
    if teacher is not None:
        _e2e_qp(model, teacher, tokenizer, config, run)
    else:
        freeze_model(model, config.torch_scale_dtype, backend=config.backend)
    return model


def _e2e_qp(model: nn.Module, teacher: nn.Module, tokenizer, config, run: Run, dataset=None,
            pack: bool = True) -> None:
    """E2E-QP: every code fixed, the scales (and norms) trained ``config.e2e_qp.steps`` steps against the teacher
    on the distillation's data, then packed (unless ``pack`` is False)."""
    from .qat import freeze_model, snap

    snap(model)
    _log(f"E2E-QP: codes fixed, {config.e2e_qp.steps} steps on the scales")
    _train(model, teacher, tokenizer, config, run, "jsd", dataset=dataset, stage="trainer-e2e-qp",
           steps=config.e2e_qp.steps, scale_learning_rate=config.e2e_qp.learning_rate)
    if pack:
        freeze_model(model, config.torch_scale_dtype, backend=config.backend)


# ------------------------------------------------------------------------------------------------- upq

INT4_STATE = "int4_stage.safetensors"


def _int4_fingerprint(config) -> str:
    """What the INT4 stage's result depends on (besides the model): a restart takes a kept state only if equal."""
    return json.dumps({"int4_group_size": config.int4_group_size, "scale_dtype": config.scale_dtype,
                       "rotation": config.rotation,
                       "modules_to_not_convert": config.modules_to_not_convert, "seed": config.seed,
                       "rtn": dataclasses.asdict(config.rtn), "ptq": dataclasses.asdict(config.ptq),
                       "data": config.stages_dict()["data"]}, sort_keys=True)


def keep_int4_state(model: nn.Module, folder: str, config) -> None:
    """Write the INT4 stage's QAT layers (latent weights, scales, zero points, biases) into ``folder`` atomically,
    with what they were made with."""
    from safetensors.torch import save_file

    from .atomic import atomic_path
    from .qat import qat_layers

    tensors = {f"{name}.{key}": tensor.detach().float().cpu().contiguous()
               for name, layer in qat_layers(model).items() for key, tensor in layer.state_dict().items()
               if key != "codes" and tensor is not None}
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, INT4_STATE)) as tmp:
        save_file(tensors, str(tmp), metadata={"fingerprint": _int4_fingerprint(config)})
    _log(f"kept the INT4 stage in {folder}")


def restore_int4_state(model: nn.Module, folder: str | None, config) -> bool:
    """Put the INT4 stage kept in ``folder`` back into the (prepared, dense) model as its QAT layers; False where
    there is none, or it was made with other settings (then the stage runs again)."""
    from safetensors import safe_open

    from .qat import QATLinear

    path = os.path.join(folder or "", INT4_STATE)
    if not folder or not os.path.isfile(path):
        return False
    with safe_open(path, framework="pt") as handle:
        if (handle.metadata() or {}).get("fingerprint") != _int4_fingerprint(config):
            _log(f"{folder} holds an INT4 stage made with other settings: running the INT4 stage again")
            return False
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    device = next(model.parameters()).device
    for name in convert.linear_layers(model, config.modules_to_not_convert):
        if f"{name}.weight" not in tensors:
            raise ValueError(f"{path} does not match this model: it has no {name}")
        weight, scale, zero, bias = (tensors.get(f"{name}.{key}") for key in ("weight", "weight_scale", "weight_zero",
                                                                             "bias"))
        layer = QATLinear(weight.to(device), scale, zero, None if bias is None else bias.to(device), 4,
                          config.int4_group_size, config.torch_scale_dtype)
        convert.replace_module(model, name, layer.requires_grad_(False))
    _log(f"restarting from the INT4 stage kept in {folder}")
    return True


@register_recipe("upq", "block-wise INT2 PTQ, then Distill-QAT of the scales; an INT4 stage first if "
                        "ptq.int4_epochs > 0",
                 stages=("rtn", "data", "ptq", "distill", "e2e_qp"), trains=True)
def upq(model: nn.Module, config, run: Run) -> nn.Module:
    from .qat import freeze_model, release_latents, snap

    tokenizer, teacher = _int2_start(model, config, run)
    calibration = _calibration(teacher, tokenizer, config)
    # 1. FP -> INT4 by block-wise PTQ (``ptq.int4_epochs`` > 0; off by default: it lost to starting INT2 from the
    #    unquantized weights on the bundled model), kept as QAT layers: their latent weights start the INT2 stage
    if config.ptq.int4_epochs:
        if not restore_int4_state(model, run.keep_int4, config):
            _ptq(model, calibration, config, run, 4, config.int4_group_size,
                 ptq=dataclasses.replace(config.ptq, epochs=config.ptq.int4_epochs), keep_qat=True)
            if run.keep_int4:
                keep_int4_state(model, run.keep_int4, config)
        release_latents(model)
    # 2. INT4 -> INT2: block-wise reconstruction from the INT4 stage's latent weights (the teacher's weights moved
    #    by that stage by a fraction of an INT4 step), against the model's own blocks (``int2_target="int4"``) or
    #    the unquantized ones (``"dense"``)
    reference = teacher if config.ptq.int2_target == "dense" else None
    _ptq(model, calibration, config, run, 2, config.group_size, layer_formats=convert.model_layer_formats(model, config),
         keep_qat=True, reference=reference)
    # 3. Distill-QAT against the unquantized teacher: the reconstruction's codes fixed, the scales (and norms) trained
    snap(model)
    trainer = _train(model, teacher, tokenizer, config, run, "jsd")
    # 4. optionally EfficientQAT's E2E-QP: the scales (and norms) alone trained again, on the same data
    if config.e2e_qp.steps:
        _e2e_qp(model, teacher, tokenizer, config, run, dataset=trainer.train_dataset)
    else:
        freeze_model(model, config.torch_scale_dtype, backend=config.backend)
    return model


def _qat_from_dense(model: nn.Module, config, run: Run, objective: str) -> nn.Module:
    from .qat import freeze_model, to_qat

    tokenizer, teacher = _int2_start(model, config, run)
    to_qat(model, bits=2, group_size=config.group_size, scale_init=config.rtn.scale_init,
           scale_dtype=config.torch_scale_dtype, modules_to_not_convert=config.modules_to_not_convert,
           layer_formats=convert.model_layer_formats(model, config), scale_grid=config.scale_grid)
    _train(model, teacher, tokenizer, config, run, objective)
    freeze_model(model, config.torch_scale_dtype, backend=config.backend)
    return model


@register_recipe("ntp", "INT2 QAT from the unquantized weights, next-token loss (ParetoQ's recipe; a baseline)",
                 stages=("rtn", "data", "distill"), trains=True)
def ntp(model: nn.Module, config, run: Run) -> nn.Module:
    return _qat_from_dense(model, config, run, "ntp")


@register_recipe("distill", "INT2 Distill-QAT (JSD to the teacher) from the unquantized weights, no INT4 stage "
                            "(a baseline)", stages=("rtn", "data", "distill"), trains=True)
def distill(model: nn.Module, config, run: Run) -> nn.Module:
    return _qat_from_dense(model, config, run, "jsd")
