"""Recipes: the ways of turning a dense model into a UPQ model, as compositions of the stages.

* ``rtn``: round to nearest (no data).
* ``ptq``: block-wise PTQ (:mod:`upq_hf.ptq`) at ``bits``.
* ``upq``: the paper's progression: block-wise PTQ to INT4 -> INT2 initialised from the INT4 model
  (optionally reconstructed block-wise at INT2 first) -> Distill-QAT with the generalized JSD to the
  unquantized teacher -> freeze into packed INT2.
* ``ntp``: INT2 QAT from the unquantized weights with next-token cross-entropy (ParetoQ's recipe).
* ``distill``: INT2 Distill-QAT (JSD) from the unquantized weights, no INT4 stage.

Data (``config.dataset``) comes from :mod:`upq_hf.data`; the default ``"self"`` is the teacher's own
answers to built-in prompts, so every recipe runs offline and uses no private data.

:data:`RECIPES` maps each name to its function and a one-line description (torchao-style registry):
``UPQConfig``'s valid recipes, the CLI's ``--recipe`` choices and the model card read it. A recipe
quantizes the model in place and returns it; it writes nothing itself: ``upq``'s INT4 restart checkpoint
(``UPQConfig.int4_checkpoint``) is saved by the ``save_int4`` function its caller passes
(:func:`upq_hf.quantizer.save_checkpoint`), so this module imports neither the quantizer nor
:mod:`upq_hf.publish`.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import convert


@dataclass(frozen=True)
class Recipe:
    """A registered recipe: ``apply(model, config, *, tokenizer, progress, callbacks, save_int4)``
    quantizes ``model`` in place and returns it; ``trains``: it runs (Distill-)QAT."""

    name: str
    apply: Callable[..., nn.Module]
    description: str
    trains: bool = False


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, description: str, trains: bool = False):
    """Decorator: add a recipe function to :data:`RECIPES` under ``name``."""

    def decorate(function):
        RECIPES[name] = Recipe(name, function, description, trains)
        return function

    return decorate


def _log(message: str) -> None:
    import sys

    print(f"[upq] {message}", file=sys.stderr, flush=True)


def _tokenizer_for(model, tokenizer):
    if tokenizer is not None:
        return tokenizer
    from .models import load_tokenizer

    return load_tokenizer(getattr(model, "name_or_path", None) or model.config._name_or_path)


def _device(config, model: nn.Module) -> torch.device:
    return torch.device(config.device) if config.device else next(model.parameters()).device


def _calibration(model, tokenizer, config) -> torch.Tensor:
    from .data import calibration_data

    return calibration_data(config.dataset, tokenizer, model=model, nsamples=config.nsamples, seqlen=config.seqlen,
                            seed=config.seed, **_self_kwargs(config))


def _self_kwargs(config) -> dict:
    return {"n_prompts": config.self_prompts} if config.dataset == "self" and config.self_prompts else {}


def _ptq(model, calibration, config, bits: int, group_size, progress: bool, epochs: int | None = None, **options):
    from .models import autocast_dtype
    from .ptq import blockwise_ptq

    device = _device(config, model)
    report = blockwise_ptq(model, calibration, bits, group_size, algorithm=config.ptq_algorithm,
                           epochs=config.ptq_epochs if epochs is None else epochs, batch_size=config.ptq_batch_size,
                           loss=config.ptq_loss, holdout=int(config.ptq_holdout * len(calibration)),
                           autocast=autocast_dtype(device, config.mixed_precision), scale_init=config.scale_init,
                           scale_dtype=config.torch_scale_dtype, modules_to_not_convert=config.modules_to_not_convert,
                           device=device, backend=config.backend, seed=config.seed, progress=progress,
                           **options)
    _log(str(report).splitlines()[0] if str(report) else "PTQ done")
    return report


def load_int4_into(model: nn.Module, path: str) -> None:
    """Put the packed layers of a saved INT4 UPQ checkpoint into ``model`` (restart from the INT4 stage)."""
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    layers = convert.upq_layers(saved)
    if not layers or any(m.bits != 4 for m in layers.values()):
        raise ValueError(f"{path} is not an INT4 UPQ checkpoint")
    wanted = convert.linear_layers(model, None)
    missing = sorted(set(layers) - set(wanted))
    if missing:
        raise ValueError(f"{path} does not match this model (e.g. {missing[0]} is not one of its linear layers)")
    device = next(model.parameters()).device
    for name, module in layers.items():
        convert.replace_module(model, name, module.to(device))


LATENTS_FILE = "upq_latent_weights.safetensors"


def save_latents(folder: str, latents: dict[str, torch.Tensor]) -> None:
    """Keep the INT4 stage's latent weights beside its checkpoint (float32, ``LATENTS_FILE``; transformers
    does not read it), so that a restart starts the INT2 stage from exactly where a straight run does."""
    from safetensors.torch import save_file

    from .atomic import atomic_path

    with atomic_path(os.path.join(folder, LATENTS_FILE)) as tmp:
        save_file({name: tensor.detach().float().cpu().contiguous() for name, tensor in latents.items()}, str(tmp))


def load_latents(folder: str) -> dict[str, torch.Tensor] | None:
    """The latent weights :func:`save_latents` kept, or None (an INT4 checkpoint saved without them)."""
    path = os.path.join(folder, LATENTS_FILE)
    if not os.path.isfile(path):
        _log(f"{folder} has no {LATENTS_FILE}: the INT2 stage starts from the dithered INT4 weights")
        return None
    from safetensors.torch import load_file

    return load_file(path)


def _train(student, teacher, tokenizer, config, objective: str, progress: bool, callbacks=None, dataset=None,
           stage: str = "trainer"):
    """Distill-QAT (or next-token QAT) of a student whose quantized layers are ``QATLinear``. ``teacher`` is
    the unquantized model: the source of ``"self"`` data for every objective, the target for ``jsd``.
    ``dataset``: a training set built by an earlier call (its ``trainer.train_dataset``) instead of a new one;
    ``stage``: the folder under ``config.work_dir`` for this call's trainer checkpoints."""
    from transformers import TrainingArguments

    from .data import TokenBlockDataset
    from .distill import UPQDistillTrainer, select_trainable

    nsamples = config.train_samples or config.train_steps * config.train_batch_size
    if dataset is None:
        dataset = TokenBlockDataset.from_source(config.dataset, tokenizer, model=teacher, nsamples=nsamples,
                                                seqlen=config.train_seqlen, seed=config.seed + 1,
                                                **_self_kwargs(config))
    else:
        nsamples = len(dataset)
    if objective == "jsd" and config.teacher_topk and not getattr(dataset, "has_teacher", False):
        from .distill import TeacherTargetsDataset

        started = time.time()
        dataset = TeacherTargetsDataset.build(dataset, teacher, k=config.teacher_topk, temperature=config.temperature,
                                              progress=progress)
        _log(f"cached the teacher's top-{config.teacher_topk} distributions on {nsamples} x {config.train_seqlen} "
             f"tokens in {time.time() - started:.0f} s")
    trainable = select_trainable(student, train_norms=config.train_norms)
    work_dir = config.work_dir or tempfile.mkdtemp(prefix="upq-train-")
    save = bool(config.work_dir)
    device = _device(config, student)
    from .models import autocast_dtype

    bf16 = autocast_dtype(device, config.mixed_precision) is not None
    args = TrainingArguments(
        output_dir=os.path.join(work_dir, stage), max_steps=config.train_steps,
        per_device_train_batch_size=config.train_batch_size, learning_rate=config.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(1, config.train_steps // 20), weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=max(1, config.train_steps // 20), report_to=[], seed=config.seed,
        save_strategy="steps" if save else "no", save_steps=max(1, config.train_steps // 4), save_total_limit=2,
        use_cpu=device.type == "cpu", disable_tqdm=not progress, dataloader_num_workers=0,
        remove_unused_columns=False, bf16=bf16,
    )
    live_teacher = objective == "jsd" and not getattr(dataset, "has_teacher", False)
    trainer = UPQDistillTrainer(model=student, teacher_model=teacher if live_teacher else None, args=args,
                                train_dataset=dataset,
                                objective=objective, beta=config.beta, temperature=config.temperature,
                                scale_learning_rate=config.scale_learning_rate, callbacks=callbacks)
    _log(f"{objective} QAT: {trainable:,} trainable parameters, {config.train_steps} steps x "
         f"{config.train_batch_size} x {config.train_seqlen} tokens ({nsamples} distinct sequences"
         f"{', bf16 autocast' if bf16 else ''})")
    resume = None
    if save and config.resume:
        from .resume import last_complete_checkpoint  # not get_last_checkpoint: a killed save leaves a partial one

        resume = last_complete_checkpoint(args.output_dir)
        _log(f"resuming from {resume}" if resume else
             f"nothing to resume in {args.output_dir} (no complete trainer checkpoint): training from the start")
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    # mixed precision wrapped the model's forward in autocast: the quantized model must not keep that wrapper
    trainer.accelerator.unwrap_model(student, keep_fp32_wrapper=False)
    elapsed = time.time() - started
    tokens = config.train_steps * config.train_batch_size * config.train_seqlen
    _log(f"trained in {elapsed:.0f} s ({tokens / max(elapsed, 1e-9):.0f} tokens/s)")
    student.requires_grad_(False)
    return trainer


def apply_recipe(model: nn.Module, config, tokenizer=None, progress: bool = False, callbacks=None,
                 save_int4: Callable | None = None) -> nn.Module:
    """Quantize ``model`` in place following ``config.recipe`` (a ``UPQConfig``); returns the model.
    ``callbacks`` go to the trainer of the training recipes (``transformers.TrainerCallback`` objects);
    ``save_int4(model, int4_config, path, tokenizer)`` saves ``upq``'s INT4 restart checkpoint."""
    recipe = RECIPES.get(config.recipe)
    if recipe is None:
        raise ValueError(f"unknown recipe {config.recipe!r}: one of {list(RECIPES)}")
    config.check_device()
    was_training = model.training
    recipe.apply(model, config, tokenizer=tokenizer, progress=progress, callbacks=callbacks, save_int4=save_int4)
    convert.check_quantized(model, config)
    return model.train(was_training)  # training recipes leave the model in training mode (dropout on)


def _prepared(model: nn.Module, config, tokenizer):
    """The model made canonical and every layer checked before any is touched (:func:`upq_hf.convert.prepare`);
    the tokenizer for the data; the model in eval mode."""
    convert.prepare(model, config)
    tokenizer = _tokenizer_for(model, tokenizer)
    model.eval()
    return tokenizer


def _teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of the dense model, in its family's layout (its own experts implementation), before
    :func:`upq_hf.convert.prepare` rewrites the model."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def _int2_start(model: nn.Module, config, tokenizer):
    """The INT2 recipes' start: the prepared model and a frozen copy of it as the teacher."""
    if config.bits != 2:
        raise ValueError(f"recipe {config.recipe!r} produces INT2: use bits=2 (or recipe='ptq' for INT4)")
    teacher = _teacher(model)
    return _prepared(model, config, tokenizer), teacher


@register_recipe("rtn", "round to nearest (no data)")
def rtn(model: nn.Module, config, *, progress: bool = False, **unused) -> nn.Module:
    convert.quantize_linears_rtn(model, config.bits, config.group_size, config.scale_init,
                                 config.torch_scale_dtype, config.modules_to_not_convert, config.backend,
                                 progress=progress, layer_formats=convert.prepare(model, config))
    return model


@register_recipe("ptq", "block-wise PTQ at `bits`")
def ptq(model: nn.Module, config, *, tokenizer=None, progress: bool = False, callbacks=None, **unused) -> nn.Module:
    # with e2e_qp_steps, EfficientQAT's two stages: block-wise PTQ, then the scales distilled from the dense model
    teacher = _teacher(model) if config.e2e_qp_steps else None
    tokenizer = _prepared(model, config, tokenizer)
    _ptq(model, _calibration(model, tokenizer, config), config, config.bits, config.group_size, progress,
         layer_formats=convert.model_layer_formats(model, config))
    if teacher is not None:
        _e2e_qp(model, teacher, tokenizer, config, progress, callbacks)
    return model


def _e2e_qp(model: nn.Module, teacher: nn.Module, tokenizer, config, progress: bool, callbacks, dataset=None):
    """E2E-QP: every code fixed, the scales (and norms) trained ``config.e2e_qp_steps`` steps against the teacher,
    then packed."""
    from .qat import freeze_model, qat_layers, to_qat

    if not qat_layers(model):
        to_qat(model)
    for layer in qat_layers(model).values():
        layer.freeze_codes()
    qp = copy.copy(config)  # not through to_dict(): that names an in-memory dataset instead of holding it
    qp.train_steps, qp.scale_learning_rate = config.e2e_qp_steps, config.e2e_qp_learning_rate
    _log(f"E2E-QP: codes fixed, {config.e2e_qp_steps} steps on the scales")
    _train(model, teacher, tokenizer, qp, "jsd", progress, callbacks, dataset=dataset, stage="trainer-e2e-qp")
    freeze_model(model, config.torch_scale_dtype, backend=config.backend)


@register_recipe("upq", "block-wise PTQ to INT4, then INT2 Distill-QAT from the INT4 model", trains=True)
def upq(model: nn.Module, config, *, tokenizer=None, progress: bool = False, callbacks=None,
        save_int4: Callable | None = None, **unused) -> nn.Module:
    from .qat import freeze_model, qat_layers, to_qat

    if config.int4_checkpoint and save_int4 is None:
        raise ValueError("UPQConfig(int4_checkpoint=...) needs save_int4, the function that saves the INT4 model: "
                         "run the recipe through upq_hf.quantize_model or from_pretrained, or pass "
                         "save_int4=upq_hf.quantizer.save_checkpoint")
    tokenizer, teacher = _int2_start(model, config, tokenizer)
    # 1. FP -> INT4 by block-wise PTQ (or restart from a saved INT4 checkpoint)
    calibration = _calibration(teacher, tokenizer, config)
    if config.int4_checkpoint and os.path.isfile(os.path.join(config.int4_checkpoint, "config.json")):
        _log(f"restarting from the INT4 checkpoint {config.int4_checkpoint}")
        load_int4_into(model, config.int4_checkpoint)
        latents = load_latents(config.int4_checkpoint)
    else:
        _ptq(model, calibration, config, 4, config.int4_group_size, progress, epochs=config.int4_ptq_epochs,
             keep_qat=True)
        latents = {name: layer.weight.detach().clone() for name, layer in qat_layers(model).items()}
        freeze_model(model, config.torch_scale_dtype, backend=config.backend)
        if config.int4_checkpoint:
            int4 = type(config)(**{**config.to_dict(), "bits": 4, "group_size": config.int4_group_size,
                                   "recipe": "ptq", "module_bits": None, "mix": None})
            save_int4(model, int4, config.int4_checkpoint, tokenizer)
            save_latents(config.int4_checkpoint, latents)
            _log(f"kept the INT4 model in {config.int4_checkpoint}")
    # 2. INT4 -> INT2: the INT2 student starts from the INT4 model's latent weights (those its codes round) and
    #    is reconstructed block-wise against its own dense blocks (the latent weights are the teacher's weights
    #    moved by the INT4 stage by a fraction of an INT4 step). Measured on the bundled model
    #    (validation prompts, INT2 g64, 80 steps per block): from the latent weights top-1 0.327 / KL 2.64, the
    #    same as from the unquantized weights (0.327 / 2.63); from the packed INT4 weights 0.248 / 3.89 (INT4's
    #    grid point 0 lies on SEQ's decision boundary at 0: all those weights round up), 0.295 / 2.91 with
    #    dithering (the fallback when an INT4 checkpoint has no latent weights). At the kv4 default with 9 epochs
    #    this reconstruction (from and against the latent weights) is well below INT2 PTQ alone (from and against
    #    the unquantized weights: 0.464 / 1.70 against 0.526 / 1.31); the
    #    scales-only Distill-QAT below lifts it to 0.542 / 1.21 (docs/BENCHMARKS.md). Open: why the gap opened.
    if config.int2_ptq:
        dither = None if latents else torch.Generator().manual_seed(config.seed)
        convert.dequantize_layers(model, weights=latents, dither=dither)
        _ptq(model, calibration, config, 2, config.group_size, progress,
             layer_formats=convert.model_layer_formats(model, config))
        to_qat(model)
    else:
        to_qat(model, bits=2, group_size=config.group_size, scale_init=config.int2_scale_init,
               scale_dtype=config.torch_scale_dtype, layer_formats=_layer_formats_of_upq(model, config))
    # 3. Distill-QAT against the unquantized teacher. By default the codes stay those of the INT2 reconstruction
    #    and only the scales (and norms) train: measured on the bundled model (validation prompts, 9 epochs of
    #    reconstruction, 30 steps), 0.542 / 1.21 and 23/24 answers on topic against 0.513 / 1.38 and 18/24 with
    #    the latent weights trained too (their codes flip; the answers suffer first).
    if not config.train_codes:
        for layer in qat_layers(model).values():
            layer.freeze_codes()
    trainer = _train(model, teacher, tokenizer, config, "jsd", progress, callbacks)
    # 4. optionally EfficientQAT's E2E-QP: the codes fixed, the scales (and norms) alone trained on the same data
    if config.e2e_qp_steps:
        _e2e_qp(model, teacher, tokenizer, config, progress, callbacks, dataset=trainer.train_dataset)
    else:
        freeze_model(model, config.torch_scale_dtype, backend=config.backend)
    return model


def _layer_formats_of_upq(model: nn.Module, config) -> dict:
    """``module_bits`` resolved against the packed layers of ``model`` (the INT4 stage's)."""
    return config.layer_formats(convert.upq_layers(model)) if config.sets_layers_apart else {}


def _qat_from_dense(model: nn.Module, config, tokenizer, progress: bool, callbacks, objective: str) -> nn.Module:
    from .qat import freeze_model, to_qat

    tokenizer, teacher = _int2_start(model, config, tokenizer)
    to_qat(model, bits=2, group_size=config.group_size, scale_init=config.scale_init,
           scale_dtype=config.torch_scale_dtype, modules_to_not_convert=config.modules_to_not_convert,
           layer_formats=convert.model_layer_formats(model, config))
    _train(model, teacher, tokenizer, config, objective, progress, callbacks)
    freeze_model(model, config.torch_scale_dtype, backend=config.backend)
    return model


@register_recipe("ntp", "INT2 QAT from the unquantized weights, next-token loss (ParetoQ's recipe)", trains=True)
def ntp(model: nn.Module, config, *, tokenizer=None, progress: bool = False, callbacks=None, **unused) -> nn.Module:
    return _qat_from_dense(model, config, tokenizer, progress, callbacks, "ntp")


@register_recipe("distill", "INT2 Distill-QAT (JSD to the teacher) from the unquantized weights, no INT4 stage",
                 trains=True)
def distill(model: nn.Module, config, *, tokenizer=None, progress: bool = False, callbacks=None,
            **unused) -> nn.Module:
    return _qat_from_dense(model, config, tokenizer, progress, callbacks, "jsd")
