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
"""

from __future__ import annotations

import copy
import os
import tempfile
import time

import torch
from torch import nn

from . import convert
from .config import UPQConfig


def _log(message: str) -> None:
    import sys

    print(f"[upq] {message}", file=sys.stderr, flush=True)


def _tokenizer_for(model, tokenizer):
    if tokenizer is not None:
        return tokenizer
    from .models import load_tokenizer

    return load_tokenizer(getattr(model, "name_or_path", None) or model.config._name_or_path)


def _device(config: UPQConfig, model: nn.Module) -> torch.device:
    return torch.device(config.device) if config.device else next(model.parameters()).device


def _calibration(model, tokenizer, config: UPQConfig) -> torch.Tensor:
    from .data import calibration_data

    return calibration_data(config.dataset, tokenizer, model=model, nsamples=config.nsamples, seqlen=config.seqlen,
                            seed=config.seed, **_self_kwargs(config))


def _self_kwargs(config: UPQConfig) -> dict:
    return {"n_prompts": config.self_prompts} if config.dataset == "self" and config.self_prompts else {}


def _ptq(model, calibration, config: UPQConfig, bits: int, group_size, progress: bool, **options):
    from .ptq import blockwise_ptq

    report = blockwise_ptq(model, calibration, bits, group_size, algorithm=config.ptq_algorithm,
                           epochs=config.ptq_epochs, scale_init=config.scale_init,
                           scale_dtype=config.torch_scale_dtype, modules_to_not_convert=config.modules_to_not_convert,
                           device=_device(config, model), backend=config.backend, seed=config.seed, progress=progress,
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


def _train(student, teacher, tokenizer, config: UPQConfig, objective: str, progress: bool, callbacks=None):
    """Distill-QAT (or next-token QAT) of a student whose quantized layers are ``QATLinear``. ``teacher`` is
    the unquantized model: the source of ``"self"`` data for every objective, the target for ``jsd``."""
    from transformers import TrainingArguments

    from .data import TokenBlockDataset
    from .distill import UPQDistillTrainer, freeze_all_but_quantized

    dataset = TokenBlockDataset.from_source(config.dataset, tokenizer, model=teacher,
                                            nsamples=config.train_steps * config.train_batch_size,
                                            seqlen=config.train_seqlen, seed=config.seed + 1, **_self_kwargs(config))
    trainable = freeze_all_but_quantized(student, train_norms=config.train_norms)
    work_dir = config.work_dir or tempfile.mkdtemp(prefix="upq-train-")
    save = bool(config.work_dir)
    device = _device(config, student)
    args = TrainingArguments(
        output_dir=os.path.join(work_dir, "trainer"), max_steps=config.train_steps,
        per_device_train_batch_size=config.train_batch_size, learning_rate=config.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(1, config.train_steps // 20), weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=max(1, config.train_steps // 20), report_to=[], seed=config.seed,
        save_strategy="steps" if save else "no", save_steps=max(1, config.train_steps // 4), save_total_limit=2,
        use_cpu=device.type == "cpu", disable_tqdm=not progress, dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = UPQDistillTrainer(model=student, teacher_model=teacher if objective == "jsd" else None, args=args,
                                train_dataset=dataset,
                                objective=objective, beta=config.beta, temperature=config.temperature,
                                scale_learning_rate=config.scale_learning_rate, callbacks=callbacks)
    _log(f"{objective} QAT: {trainable:,} trainable parameters, {config.train_steps} steps x "
         f"{config.train_batch_size} x {config.train_seqlen} tokens")
    resume = None
    if save and config.resume:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir)
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.time() - started
    tokens = config.train_steps * config.train_batch_size * config.train_seqlen
    _log(f"trained in {elapsed:.0f} s ({tokens / max(elapsed, 1e-9):.0f} tokens/s)")
    student.requires_grad_(False)
    return trainer


def apply_recipe(model: nn.Module, config: UPQConfig, tokenizer=None, progress: bool = False,
                 callbacks=None) -> nn.Module:
    """Quantize ``model`` in place following ``config.recipe``; returns the model. ``callbacks`` go to the
    trainer of the training recipes (``transformers.TrainerCallback`` objects)."""
    from .qat import freeze_model, to_qat

    recipe = config.recipe
    config.check_device()
    if recipe == "rtn":
        convert.quantize_linears_rtn(model, config.bits, config.group_size, config.scale_init,
                                     config.torch_scale_dtype, config.modules_to_not_convert, config.backend,
                                     progress=progress)
        return model
    convert.check_layers(convert.linear_layers(model, config.modules_to_not_convert), config.group_size)
    tokenizer = _tokenizer_for(model, tokenizer)
    model.eval()
    if recipe == "ptq":
        _ptq(model, _calibration(model, tokenizer, config), config, config.bits, config.group_size, progress)
        return model
    if config.bits != 2:
        raise ValueError(f"recipe {recipe!r} produces INT2: use bits=2 (or recipe='ptq' for INT4)")
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if recipe in ("ntp", "distill"):
        to_qat(model, bits=2, group_size=config.group_size, scale_init=config.scale_init,
               scale_dtype=config.torch_scale_dtype, modules_to_not_convert=config.modules_to_not_convert)
        _train(model, teacher, tokenizer, config, "ntp" if recipe == "ntp" else "jsd", progress, callbacks)
        freeze_model(model, config.torch_scale_dtype, backend=config.backend)
        return model
    if recipe != "upq":
        raise ValueError(f"unknown recipe {recipe!r}")
    # 1. FP -> INT4 by block-wise PTQ (or restart from a saved INT4 checkpoint)
    calibration = _calibration(teacher, tokenizer, config)
    if config.int4_checkpoint and os.path.isfile(os.path.join(config.int4_checkpoint, "config.json")):
        _log(f"restarting from the INT4 checkpoint {config.int4_checkpoint}")
        load_int4_into(model, config.int4_checkpoint)
    else:
        _ptq(model, calibration, config, 4, config.int4_group_size, progress)
        if config.int4_checkpoint:
            from .publish import save_atomic
            from .quantizer import attach

            int4 = copy.copy(config.to_dict())
            int4.update(bits=4, group_size=config.int4_group_size, recipe="ptq")
            attach(model, UPQConfig(**int4))
            save_atomic(model, config.int4_checkpoint, tokenizer=tokenizer, overwrite=True)
            _log(f"kept the INT4 model in {config.int4_checkpoint}")
    # 2. INT4 -> INT2: latent weights = the dequantized INT4 weights
    if config.int2_ptq:
        convert.dequantize_layers(model)
        # start from the INT4 weights and reconstruct the INT4 model's blocks. Reconstructing the unquantized
        # teacher's blocks instead (``reference=teacher``) measured worse on the bundled model (KL 9.43 vs
        # 8.74 at the start of distillation). The latent weights stay on the INT2 grid (codes and scales
        # exactly as packed): keeping the reconstruction's latent weights (``keep_qat``) puts many next to a
        # rounding boundary, where the first Adam updates flip them by gradient sign (KL 8.7 -> 22 in five
        # steps, against 8.7 -> 8.65 from the grid).
        _ptq(model, calibration, config, 2, config.group_size, progress)
        to_qat(model)
    else:
        to_qat(model, bits=2, group_size=config.group_size, scale_init=config.int2_scale_init,
               scale_dtype=config.torch_scale_dtype)
    # 3. Distill-QAT against the unquantized teacher, then pack
    _train(model, teacher, tokenizer, config, "jsd", progress, callbacks)
    freeze_model(model, config.torch_scale_dtype, backend=config.backend)
    return model
