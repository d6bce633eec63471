"""Writing a quantized model out: an atomic ``save_pretrained``, the model card, the push to the Hub.

* :func:`save_atomic`: ``save_pretrained`` (and the tokenizer's) into a temporary folder renamed into place
  only once everything is written (:mod:`upq_hf.atomic`): an interrupted or failed run never leaves a
  half-written checkpoint;
* :func:`model_card` / :func:`write_model_card`: README.md with YAML metadata (base model, format, recipe,
  data, training budget, measured numbers from ``upq_report.json``) and a load snippet;
* :func:`push_folder`: one Hub commit with every file of a saved checkpoint (and its card);
* :func:`install_card_hooks`: a UPQ model's ``save_pretrained`` / ``push_to_hub`` write the card too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .atomic import atomic_path, clean_stale
from .recipes import RECIPES


class CheckpointExistsError(FileExistsError):
    pass


def prepare_target(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that ``out`` can be written (before any expensive work starts). What a killed earlier run left
    beside it is handled first (:func:`upq_hf.atomic.clean_stale`): its temporaries go, and a checkpoint it
    had moved aside to replace comes back."""
    target = Path(out)
    clean_stale(target)
    if target.exists() and not overwrite:
        raise CheckpointExistsError(f"{target} already exists: choose another --out or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise CheckpointExistsError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def save_atomic(model, out: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                extra_files: dict[str, str] | None = None) -> Path:
    """``save_pretrained`` into ``out`` through a temporary folder renamed into place at the end."""
    target = prepare_target(out, overwrite)
    with atomic_path(target, folder=True) as tmp:
        for name, text in (extra_files or {}).items():  # first: the model card reads upq_report.json
            (tmp / name).write_text(text)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return target


# ------------------------------------------------------------------------------------------------ model card

REPORT_FILE = "upq_report.json"


def _yaml_value(value) -> str:
    import json

    return json.dumps(value)  # JSON scalars and lists are valid YAML


def base_model_of(name_or_path: str | None) -> str | None:
    """The Hub id a model came from, for the card's ``base_model``: the bundled model's folder is
    ``HuggingFaceTB/SmolLM2-135M-Instruct``; a name spelled like a Hub id that is no local folder is itself;
    a local folder tells nothing (``None``: the Hub refuses a path as ``base_model``)."""
    if not name_or_path:
        return None
    from .models import BUNDLED_ALIASES, BUNDLED_NAME, _is_hub_id, cache_dir

    name = str(name_or_path)
    bundled = f"HuggingFaceTB/{BUNDLED_NAME}"
    if name in BUNDLED_ALIASES:
        return bundled
    path = Path(name).expanduser()
    if path.exists():
        try:
            return bundled if path.resolve() == (cache_dir() / BUNDLED_NAME).resolve() else None
        except OSError:
            return None
    return name if _is_hub_id(name) else None


def layer_summary(folder: str | os.PathLike) -> dict:
    """``{"formats": [(bits, group_size, layers), ...], "bits_per_weight": average}`` of a saved checkpoint,
    from its safetensors headers (:func:`upq_hf.checkpoint.checkpoint_info`)."""
    from .checkpoint import checkpoint_info

    info = checkpoint_info(str(folder))
    counts: dict[tuple, int] = {}
    for entry in info["layers"].values():
        groups = entry.get("groups", 1)
        group = entry["in_features"] // groups if groups > 1 else None
        counts[(entry["bits"], group)] = counts.get((entry["bits"], group), 0) + 1
    formats = sorted(((b, g, n) for (b, g), n in counts.items()), key=lambda f: (f[0], f[1] or 1 << 30))
    return {"formats": formats, "bits_per_weight": info["bits_per_weight"]}


def _format_name(bits, group) -> str:
    kind = "SEQ" if bits == 2 else "asymmetric"
    return f"INT{bits} {kind}, {'per-row scales' if group is None else f'group size {group}'}"


def model_card(config: dict, base_model: str | None = None, report: dict | None = None,
               layers: dict | None = None) -> str:
    """README.md (YAML metadata + text) for a UPQ checkpoint: what it is, how it was made, how it scores,
    how to load it. ``config`` is the ``quantization_config`` dict; ``report`` holds measured numbers;
    ``layers`` (:func:`layer_summary`) the per-format layer counts and the average bits per weight."""
    from .config import UPQConfig

    report = report or {}
    bits = config.get("bits")
    group = config.get("group_size")
    recipe = config.get("recipe", "rtn")
    groups = "one scale per output row" if group is None else f"one scale per {group} input columns"
    fmt = "SEQ INT2 (levels (k - 1.5) * s, no zero level)" if bits == 2 else "asymmetric INT4 (scale and zero point)"
    known = RECIPES.get(recipe)
    training = known is not None and known.trains
    stages = UPQConfig.from_dict(config) if known is not None else None  # older configs' flat keys read too
    distill, e2e_qp = (stages.distill, stages.e2e_qp) if stages is not None else (None, None)
    tokens = distill.steps * distill.batch_size * distill.seqlen if training else 0
    dataset = stages.stages_dict()["data"]["dataset"] if stages is not None and recipe != "rtn" else None
    formats = (layers or {}).get("formats") or []
    mixed = len(formats) > 1
    widths = sorted({f[0] for f in formats}) or [bits]
    tags = ["upq", *(f"int{b}" for b in widths), "quantized", "upq_hf"] + (["mixed-precision"] if mixed else [])
    meta = ["---", "library_name: transformers", f"tags: {_yaml_value(tags)}"]
    if base_model:
        meta += [f"base_model: {_yaml_value(base_model)}", "base_model_relation: quantized"]
    meta += ["upq:", f"  bits: {bits}", f"  group_size: {_yaml_value(group)}", f"  recipe: {_yaml_value(recipe)}",
             f"  format_version: {config.get('format_version', 1)}"]
    if layers:
        meta.append(f"  bits_per_weight: {round(layers['bits_per_weight'], 4)}")
    if mixed:
        meta.append("  layer_formats:")
        meta += [f"    - {{bits: {b}, group_size: {_yaml_value(g)}, layers: {n}}}" for b, g, n in formats]
    rotation = config.get("rotation") if config.get("rotation") != "auto" else None  # "auto": resolved when quantized
    if rotation:
        meta.append(f"  rotation: {_yaml_value(rotation)}")
    if dataset is not None:
        meta.append(f"  dataset: {_yaml_value(str(dataset))}")
    if training:
        meta += [f"  train_steps: {distill.steps}", f"  train_tokens: {tokens}", f"  beta: {distill.beta}"]
    if e2e_qp is not None and e2e_qp.steps:
        meta.append(f"  e2e_qp_steps: {e2e_qp.steps}")
    metrics = report.get("metrics") or {}
    if metrics:
        meta.append("  metrics:")
        meta += [f"    {key}: {_yaml_value(value)}" for key, value in metrics.items()]
    meta.append("---")
    if mixed:
        what = "mixed " + "/".join(f"INT{b}" for b in widths)
    else:
        what = f"INT{bits} ({'SEQ' if bits == 2 else 'asymmetric'}, "
        what += f"{'per-row scales' if group is None else f'group size {group}'})"
    title = f"{base_model.split('/')[-1]} - UPQ {what}" if base_model else f"UPQ {what} checkpoint"
    lines = [
        f"# {title}",
        "",
        f"Weight-only {'mixed-precision ' if mixed else ''}{fmt if not mixed else 'UPQ'} quantization"
        + ("" if mixed else f", {groups}")
        + f", made with upq_hf (`pip install upq_hf`; Unified Progressive Quantization, arXiv 2506.09104) by the "
          f"`{recipe}` recipe" + (f" ({known.description})." if known else ".")
        + (f" Base model: `{base_model}`." if base_model else ""),
        "",
        "| | |",
        "|---|---|",
        f"| bits | {bits}{' (the default; see the formats below)' if mixed else ''} |",
        f"| group size | {'per row' if group is None else group} |",
        f"| recipe | {recipe} |",
    ]
    if layers:
        lines.append(f"| bits per weight (average: codes + scales{' + zeros' if 4 in widths else ''}) | "
                     f"{layers['bits_per_weight']:.3f} |")
    if rotation:
        lines.append(f"| residual stream | turned by a {rotation} rotation fused into the weights (nothing to undo at "
                     f"inference; the head is untied) |")
    if dataset is not None:
        lines.append(f"| data | {dataset} |")
    if training:
        lines.append(f"| training budget | {distill.steps} steps, {tokens:,} tokens, beta {distill.beta} |")
    if e2e_qp is not None and e2e_qp.steps:
        lines.append(f"| E2E-QP (codes fixed, scales trained) | {e2e_qp.steps} steps at {e2e_qp.learning_rate} |")
    if mixed:
        lines += ["", "## Formats", "", "| format | layers |", "|---|---|"]
        lines += [f"| {_format_name(b, g)} | {n} |" for b, g, n in formats]
        if config.get("mix"):
            lines += ["", f"Mixed-precision preset `{config['mix']}`, resolved into the overrides below."]
        if config.get("module_bits"):
            lines += ["", f"Per-module overrides (`module_bits`, first matching pattern wins): "
                          f"`{_yaml_value(config['module_bits'])}`."]
    if metrics:
        lines += ["", "## Measured", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
                  for key, value in metrics.items()]
    lines += [
        "", "## Use", "", "```python",
        "import upq_hf  # registers quant_method='upq' with transformers (pip install upq_hf)",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "", 'model = AutoModelForCausalLM.from_pretrained("REPO_OR_PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("REPO_OR_PATH")', "```", "",
        "Without `import upq_hf` transformers does not know the `upq` method and refuses the packed weights.",
    ]
    return "\n".join(meta) + "\n" + "\n".join(lines) + "\n"


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def folder_card(folder: str | os.PathLike, base_model: str | None = None, default_base: str | None = None) -> str:
    """The model card of a saved UPQ checkpoint folder, from its config.json, ``upq_report.json`` and the
    safetensors headers (per-format layer counts, bits per weight). The base model: ``base_model``, else the
    report's, else config.json's ``_name_or_path``, else ``default_base`` (each only if it is a Hub id)."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "upq":
        raise ValueError(f"{folder} is not a UPQ checkpoint")
    report = _read_json(folder / REPORT_FILE)
    base_model = (base_model or base_model_of(report.get("base_model")) or base_model_of(config.get("_name_or_path"))
                  or base_model_of(default_base))
    return model_card(qconfig, base_model, report, layer_summary(folder))


def write_model_card(folder: str | os.PathLike, base_model: str | None = None,
                     default_base: str | None = None) -> Path:
    """Write README.md into a saved UPQ checkpoint folder (see :func:`folder_card`), atomically."""
    from .atomic import write_text

    return write_text(Path(folder) / "README.md", folder_card(folder, base_model, default_base))


def record_report(folder: str | os.PathLike, **entries) -> Path:
    """Merge ``entries`` (``metrics={...}``, ``base_model=...``) into a saved checkpoint's ``upq_report.json``
    and rewrite its model card from it (each file atomically): how numbers measured after saving, as the
    demo measures them on the reloaded checkpoint, reach the card."""
    import json

    from .atomic import write_text

    folder = Path(folder)
    report = _read_json(folder / REPORT_FILE)
    for key, value in entries.items():
        report[key] = {**report.get(key, {}), **value} if isinstance(value, dict) else value
    write_text(folder / REPORT_FILE, json.dumps(report, indent=2))
    return write_model_card(folder)


def push_folder(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload UPQ checkpoint"):
    """Upload a saved UPQ checkpoint folder (with its model card, written if missing) to the Hub. Raises
    :class:`~upq_hf.errors.HubAuthError` without a token or when the Hub refuses it,
    :class:`~upq_hf.errors.HubUnreachableError` when the Hub cannot be reached and
    :class:`~upq_hf.errors.HubError` for any other refusal, each with a one-line message."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    from .checkpoint import checkpoint_info

    checkpoint_info(str(folder))  # a clear error for anything but a UPQ checkpoint
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    if not (folder / "README.md").is_file():
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=folder_card(folder).encode()))
    token = token or _stored_token()
    api = HfApi(token=token)
    with hub_errors(repo_id, api.endpoint, folder):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.create_commit(repo_id, operations=operations, commit_message=commit_message)  # a CommitInfo


def _stored_token() -> str:
    from huggingface_hub import get_token

    from .errors import HubAuthError

    token = get_token()
    if not token:
        raise HubAuthError("no Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass --token")
    return token


@contextlib.contextmanager
def hub_errors(repo_id: str, endpoint: str, folder=None):
    """Turn what ``huggingface_hub`` raises when the Hub is out of reach or refuses a request into one-line
    :mod:`upq_hf.errors` errors."""
    from huggingface_hub.errors import HfHubHTTPError

    from .errors import HubAuthError, HubError, HubUnreachableError, transport_errors

    unchanged = f"; nothing was uploaded{f' and {folder} is unchanged' if folder else ''}"
    try:
        yield
    except HfHubHTTPError as error:
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        reason = getattr(response, "reason_phrase", "") or ""
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if status in (401, 403):
            raise HubAuthError(f"the Hugging Face Hub refused the token for {repo_id} ({status} {reason}".rstrip()
                               + f"): log in with `hf auth login` with a token that can write to {repo_id}, "
                                 f"or pass --token{unchanged}") from None
        raise HubError(f"the Hugging Face Hub refused to push {repo_id}: {first}{unchanged}") from None
    except transport_errors() as error:
        raise HubUnreachableError(f"could not reach the Hugging Face Hub at {endpoint} to push {repo_id} "
                                  f"({type(error).__name__}: {error}): check the network (or HF_ENDPOINT)"
                                  f"{unchanged}") from None


# ------------------------------------------------------------------------------------------------ hooks

def _save_with_card(self, save_directory, *args, **kwargs):
    """``save_pretrained`` of a UPQ model: the class's own, then the model card (and the push, if asked)."""
    push = kwargs.pop("push_to_hub", False)
    repo_id = kwargs.pop("repo_id", None)
    token = kwargs.pop("token", None)
    private = kwargs.pop("private", None)
    commit_message = kwargs.pop("commit_message", None)
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        write_model_card(save_directory, default_base=getattr(self, "name_or_path", None))
        if push:
            push_folder(save_directory, repo_id or Path(save_directory).name, token=token, private=private,
                        commit_message=commit_message or "Upload UPQ checkpoint")
    return result


def _push_with_card(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, max_shard_size="50GB", **unused):
    """``push_to_hub`` of a UPQ model: save (with the model card) into a temporary folder and upload it."""
    with tempfile.TemporaryDirectory() as tmp:
        self.save_pretrained(tmp, max_shard_size=max_shard_size)
        return push_folder(tmp, repo_id, token=token, private=private,
                           commit_message=commit_message or "Upload UPQ checkpoint")


def remove_card_hooks(model) -> None:
    """Undo :func:`install_card_hooks` (a model dequantized to dense saves as any dense model)."""
    for name in ("save_pretrained", "push_to_hub"):
        model.__dict__.pop(name, None)


def install_card_hooks(model) -> None:
    """Make ``model.save_pretrained`` and ``model.push_to_hub`` write the UPQ model card (per instance)."""
    import types

    model.save_pretrained = types.MethodType(_save_with_card, model)
    model.push_to_hub = types.MethodType(_push_with_card, model)
