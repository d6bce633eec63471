"""docs/errors.md, "What goes wrong and what you see": every row of that table, run, and its message checked verbatim.

The table is the spec: each row's "what you see" cell holds the message in a code span (for the CLI the
whole stderr line, for Python the exception's class in one span and its message in the next); the
placeholders ``<DIR>``, ``<OUT>``, ``<FILE>``, ``<ENDPOINT>`` stand for the paths a case uses. Every CLI row must exit
with its status (2 unless the row says otherwise) and print exactly one ``upq: error:`` line and no
traceback; the rows that fail before any work print nothing else at all. A row whose outcome is a state
rather than a message names the test (in ``test_kill.py``) that checks it with real subprocesses.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import upq_hf
from upq_hf import UPQConfig, cli

from helpers import tiny_llama

README = Path(__file__).parents[1] / "docs" / "errors.md"
SECTION = "## What goes wrong and what you see"


def readme_rows() -> list[tuple[str, str, str]]:
    """``(what goes wrong, example, what you see)`` of each row of the README's table."""
    text = README.read_text()
    assert SECTION in text, f"docs/errors.md has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells[0] == "what goes wrong":
            continue
        assert len(cells) == 3, f"a row of the README table has {len(cells)} cells: {line}"
        rows.append(tuple(cells))
    return rows


def code_spans(cell: str) -> list[str]:
    return [m.group(2).strip() for m in re.finditer(r"(`+)(.+?)\1", cell)]


# ---------------------------------------------------------------------------------------------- the cases

@dataclass
class Outcome:
    code: int | None = None  # CLI
    err: str = ""
    error: BaseException | None = None  # Python API
    where: dict = field(default_factory=dict)  # placeholder -> value


class Context:
    def __init__(self, tmp: Path, shared: dict, capsys, monkeypatch):
        self.tmp, self.shared, self.capsys, self.monkeypatch = tmp, shared, capsys, monkeypatch

    def cli(self, *argv, **where) -> Outcome:
        self.capsys.readouterr()
        code = cli.main([str(a) for a in argv])
        return Outcome(code=code, err=self.capsys.readouterr().err, where=where)

    def cli_parse(self, *argv, **where) -> Outcome:
        """Argument errors exit through argparse (SystemExit)."""
        self.capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(a) for a in argv])
        return Outcome(code=exit_info.value.code, err=self.capsys.readouterr().err, where=where)

    def python(self, function, **where) -> Outcome:
        try:
            function()
        except Exception as error:  # noqa: BLE001 - the case checks what it is
            return Outcome(error=error, where=where)
        raise AssertionError("no error was raised")

    @property
    def tiny(self) -> str:
        return self.shared["tiny"]

    @property
    def tinytok(self) -> str:
        return self.shared["tinytok"]

    def checkpoint(self) -> Path:
        """A fresh copy of a small UPQ checkpoint."""
        import shutil

        path = self.tmp / "ckpt"
        shutil.copytree(self.shared["ckpt"], path)
        return path

    def out(self) -> str:
        return str(self.tmp / "out")

    def offline(self):
        from huggingface_hub import constants

        self.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        self.monkeypatch.setattr(constants, "HF_HUB_CACHE", str(self.tmp / "hub-cache"))
        self.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        try:
            import datasets

            self.monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        except (ImportError, AttributeError):
            pass


def no_gpu(ctx):
    if torch.cuda.is_available():
        pytest.fail("this row is about a machine without a GPU: run it where torch.cuda.is_available() is False")


def quantize(ctx, *options, model=None, **where):
    return ctx.cli("quantize", model or ctx.tiny, *options, "--out", ctx.out(), **where)


def bad_bits_cli(ctx):
    return ctx.cli_parse("quantize", ctx.tiny, "--bits", "3", "--out", ctx.out())


def group_not_dividing(ctx):
    return quantize(ctx, "--bits", "2", "--group-size", "48")


def group_not_positive(ctx):
    return quantize(ctx, "--bits", "2", "--group-size", "0")


def group_not_a_number(ctx):
    return ctx.cli_parse("quantize", ctx.tiny, "--bits", "2", "--group-size", "abc", "--out", ctx.out())


def unknown_recipe_cli(ctx):
    return ctx.cli_parse("quantize", ctx.tiny, "--bits", "2", "--recipe", "gptq", "--out", ctx.out())


def int2_recipe_at_4_bits(ctx):
    return quantize(ctx, "--bits", "4", "--recipe", "upq", "--dataset", ctx.shared["texts"], model=ctx.tinytok)


def stream_other_recipe(ctx):
    return quantize(ctx, "--bits", "2", "--recipe", "ptq", "--stream", "on", model=ctx.tinytok)


def stage_file(ctx, stages: dict) -> str:
    """A ``--config`` file of ``stages`` in the case's folder."""
    path = ctx.tmp / "stages.json"
    path.write_text(json.dumps(stages))
    return str(path)


def beta_out_of_range(ctx):
    return quantize(ctx, "--bits", "2", "--recipe", "upq", "--config", stage_file(ctx, {"distill": {"beta": 2}}),
                    model=ctx.tinytok)


def budget_not_positive(ctx):
    return quantize(ctx, "--bits", "2", "--recipe", "distill", "--config", stage_file(ctx, {"distill": {"steps": 0}}),
                    model=ctx.tinytok)


def unknown_stage_field(ctx):
    return quantize(ctx, "--bits", "2", "--recipe", "upq", "--config", stage_file(ctx, {"ptq": {"epoch": 6}}),
                    model=ctx.tinytok)


def config_file_not_json(ctx):
    path = ctx.tmp / "stages.json"
    path.write_text("{ptq: {epochs: 6}}")
    return quantize(ctx, "--bits", "2", "--recipe", "upq", "--config", str(path), model=ctx.tinytok, FILE=str(path))


def pattern_matching_no_layer(ctx):
    config = UPQConfig(bits=2, group_size=32, module_bits={"kv_proj": 4})
    return ctx.python(lambda: AutoModelForCausalLM.from_pretrained(ctx.tiny, quantization_config=config))


def module_bits_malformed(ctx):
    return ctx.cli_parse("quantize", ctx.tiny, "--module-bits", "k_proj", "--out", ctx.out())


def mix_at_4_bits(ctx):
    return quantize(ctx, "--bits", "4", "--mix", "kv4")


def mix_without_its_layers(ctx):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                                       eos_token_id=0))
    config = UPQConfig(bits=2, group_size=32, mix="kv4", modules_to_not_convert=["c_attn"])  # no k/v left to place
    return ctx.python(lambda: upq_hf.quantize_model(model, config))


def unknown_decoder_weight(ctx):
    from helpers import tiny_llama

    model = tiny_llama()
    model.model.layers[0].mlp.mixer = torch.nn.Conv1d(64, 64, 4)  # as a state-space block's convolution
    return ctx.python(lambda: upq_hf.quantize_model(model, UPQConfig(bits=2, group_size=32)))


def negative_teacher_topk(ctx):
    return quantize(ctx, "--bits", "2", "--recipe", "upq", "--config",
                    stage_file(ctx, {"distill": {"teacher_topk": -1}}), model=ctx.tinytok)


def missing_model_path(ctx):
    return quantize(ctx, "--bits", "2", model="/nonexistent/model")


def folder_without_model(ctx):
    folder = ctx.tmp / "empty"
    folder.mkdir()
    return quantize(ctx, "--bits", "2", model=folder, DIR=str(folder))


def file_instead_of_folder(ctx):
    path = Path(ctx.tiny) / "model.safetensors"
    return quantize(ctx, "--bits", "2", model=path, FILE=str(path))


def hub_out_of_reach(ctx):
    """Offline mode, then a Hub that refuses connections (a closed local port): the same one line."""
    from huggingface_hub import constants

    ctx.monkeypatch.setattr(constants, "HF_HUB_CACHE", str(ctx.tmp / "hub-cache"))
    ctx.monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    ctx.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    online = quantize(ctx, "--bits", "2", model="upq-test/no-such-model")
    ctx.offline()
    offline = quantize(ctx, "--bits", "2", model="upq-test/no-such-model")
    assert online.code == 2 and online.err == offline.err
    return offline


def no_tokenizer(ctx):
    return quantize(ctx, "--bits", "2", "--recipe", "ptq", DIR=ctx.tiny)


def device_cuda_cli(ctx):
    no_gpu(ctx)
    return quantize(ctx, "--bits", "2", "--device", "cuda")


def backend_triton_cli(ctx):
    no_gpu(ctx)
    return quantize(ctx, "--bits", "2", "--backend", "triton")


def backend_avx2_unbuildable_cli(ctx):
    import shutil

    from upq_hf import avx2

    compiler = shutil.which("false")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CC", "false")
            patch.setenv("UPQ_CACHE", str(ctx.tmp / "cache"))  # nothing compiled there
            avx2._load.cache_clear()
            return quantize(ctx, "--bits", "2", "--backend", "avx2", CC=compiler)
    finally:
        avx2._load.cache_clear()  # the next call builds (or finds) the real kernel again


def backend_a8_without_vnni_cli(ctx):
    from upq_hf import avx2

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(avx2.kernel(), "a8", False)  # as on a CPU without AVX512-VNNI
        return quantize(ctx, "--bits", "2", "--backend", "a8")


def device_cuda_python(ctx):
    no_gpu(ctx)
    model = tiny_llama()
    return ctx.python(lambda: upq_hf.quantize_model(model, UPQConfig(bits=2, group_size=32), device="cuda"))


def backend_triton_python(ctx):
    no_gpu(ctx)
    config = UPQConfig(bits=2, group_size=32, backend="triton")
    return ctx.python(lambda: AutoModelForCausalLM.from_pretrained(ctx.tiny, quantization_config=config))


def eval_device_cuda(ctx):
    no_gpu(ctx)
    return ctx.cli("eval", ctx.tiny, "--tasks", "fidelity", "--device", "cuda")


def disk_in_device_map(ctx):
    config = UPQConfig(bits=2, group_size=32)
    return ctx.python(lambda: AutoModelForCausalLM.from_pretrained(
        ctx.tiny, quantization_config=config, device_map={"model": "cpu", "lm_head": "disk"},
        offload_folder=str(ctx.tmp / "offload")))


def dataset_missing(ctx):
    return quantize(ctx, "--bits", "2", "--recipe", "ptq", "--dataset", "missing.txt", model=ctx.tinytok)


def dataset_empty(ctx):
    path = ctx.tmp / "empty.txt"
    path.write_text("\n\n")
    return quantize(ctx, "--bits", "2", "--recipe", "ptq", "--dataset", path, model=ctx.tinytok, FILE=str(path))


def hub_dataset_offline(ctx):
    ctx.offline()
    return quantize(ctx, "--bits", "2", "--recipe", "ptq", "--dataset", "upq-test/no-such-dataset", model=ctx.tinytok)


def out_exists(ctx):
    Path(ctx.out()).mkdir()
    (Path(ctx.out()) / "mine.txt").write_text("mine")
    outcome = quantize(ctx, "--bits", "2", OUT=ctx.out())
    assert (Path(ctx.out()) / "mine.txt").read_text() == "mine"
    return outcome


def out_is_a_file(ctx):
    Path(ctx.out()).write_text("a file")
    return quantize(ctx, "--bits", "2", "--overwrite", OUT=ctx.out())


def _gpt2(ctx) -> str:
    """A tiny GPT-2 folder that speaks the bundled tokenizer (made once per module)."""
    if "gpt2" not in ctx.shared:
        from transformers import GPT2Config, GPT2LMHeadModel

        from upq_hf.models import load_tokenizer

        tokenizer = load_tokenizer(None)
        folder = Path(ctx.shared["tiny"]).parent / "gpt2"
        GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer), n_positions=64)
                        ).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        ctx.shared["gpt2"] = str(folder)
    return ctx.shared["gpt2"]


def generate_native_other_family(ctx):
    folder = _gpt2(ctx)
    return ctx.cli("generate", folder, "--prompt", "Hi", "--engine", "native", DIR=folder)


def native_decoder_other_family(ctx):
    from transformers import AutoModelForCausalLM

    from upq_hf.native import NativeDecoder

    model = AutoModelForCausalLM.from_pretrained(_gpt2(ctx))
    return ctx.python(lambda: NativeDecoder(model))


def generate_no_new_tokens(ctx):
    return ctx.cli("generate", ctx.tinytok, "--prompt", "Hi", "--max-new-tokens", "0", DIR=ctx.tinytok)


def info_not_upq(ctx):
    return ctx.cli("info", ctx.tiny, DIR=ctx.tiny)


def info_missing(ctx):
    path = ctx.tmp / "nothing"
    return ctx.cli("info", path, DIR=str(path))


def corrupt_cli(ctx):
    path = ctx.checkpoint()
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return ctx.cli("info", path, FILE=str(weights))


def corrupt_python(ctx):
    path = ctx.checkpoint()
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return ctx.python(lambda: AutoModelForCausalLM.from_pretrained(path), FILE=str(weights))


def mismatched_python(ctx):
    from safetensors.torch import load_file, save_file

    path = ctx.checkpoint()
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key][:2].clone()
    save_file(tensors, weights, metadata={"format": "pt", "upq_format_version": "1"})
    return ctx.python(lambda: AutoModelForCausalLM.from_pretrained(path), FILE=str(weights))


def newer_format(ctx):
    path = ctx.checkpoint()
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 3
    (path / "config.json").write_text(json.dumps(config))
    return ctx.python(lambda: AutoModelForCausalLM.from_pretrained(path))


def without_import(ctx):
    """As in a fresh interpreter that never ran ``import upq_hf``: the registration is not there."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    path = ctx.checkpoint()
    ctx.monkeypatch.delitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "upq")
    ctx.monkeypatch.delitem(AUTO_QUANTIZER_MAPPING, "upq")
    return ctx.python(lambda: AutoModelForCausalLM.from_pretrained(path))


class _Refuse(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        body = b'{"error": "Invalid credentials in Authorization header"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def push_no_network(ctx):
    from huggingface_hub import constants

    ctx.monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port: connection refused
    ctx.monkeypatch.setenv("HF_TOKEN", "hf_upqFakeToken")
    path = ctx.checkpoint()
    return ctx.cli("push", path, "user/tiny", ENDPOINT="http://127.0.0.1:9", DIR=str(path))


def push_no_token(ctx):
    from huggingface_hub import constants

    ctx.monkeypatch.delenv("HF_TOKEN", raising=False)
    ctx.monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    ctx.monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(ctx.tmp / "no-token"))
    ctx.monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(ctx.tmp / "no-tokens"), raising=False)
    return ctx.cli("push", ctx.checkpoint(), "user/tiny")


def push_refused_token(ctx):
    from huggingface_hub import constants

    server = HTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ctx.monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        path = ctx.checkpoint()
        return ctx.cli("push", path, "user/tiny", "--token", "hf_notAValidToken", DIR=str(path))
    finally:
        server.shutdown()


def push_not_upq(ctx):
    return ctx.cli("push", ctx.tiny, "user/tiny", DIR=ctx.tiny)


def interrupted(ctx):
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def save_then_interrupt(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)
        raise KeyboardInterrupt

    ctx.monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_interrupt)
    outcome = quantize(ctx, "--bits", "2", "--fidelity-prompts", "0")
    assert os.listdir(ctx.tmp) == []  # neither the target nor a temporary
    return outcome


def resume_with_nothing(ctx):
    stages = stage_file(ctx, {"distill": {"steps": 1, "batch_size": 1, "seqlen": 16, "samples": 2}})
    outcome = quantize(ctx, "--bits", "2", "--recipe", "distill", "--dataset", ctx.shared["texts"], "--config", stages,
                       "--fidelity-prompts", "0", "--resume", model=ctx.tinytok, OUT=ctx.out())
    assert (Path(ctx.out()) / "model.safetensors").is_file()
    return outcome


def python_error(function):
    return lambda ctx: ctx.python(function)


@dataclass
class Case:
    run: object
    code: int = 2  # CLI exit status
    before_work: bool = False  # CLI: nothing at all is printed besides the error line
    covered_by: str | None = None  # a test in test_kill.py that checks this row with real subprocesses


CASES: dict[str, Case] = {
    "`--bits` not 2 or 4 (CLI)": Case(bad_bits_cli, before_work=True),
    "`bits` not 2 or 4 (Python)": Case(python_error(lambda: UPQConfig(bits=3))),
    "a group size that does not divide a layer's input size": Case(group_not_dividing, before_work=True),
    "a group size that is not positive": Case(group_not_positive, before_work=True),
    "a group size that is not a number": Case(group_not_a_number, before_work=True),
    "an unknown recipe (CLI)": Case(unknown_recipe_cli, before_work=True),
    "an unknown recipe (Python)": Case(python_error(lambda: UPQConfig(recipe="gptq"))),
    "an INT2-only recipe at 4 bits": Case(int2_recipe_at_4_bits),
    "`--stream on` with a recipe other than upq": Case(stream_other_recipe, before_work=True),
    "`beta` outside [0, 1]": Case(beta_out_of_range, before_work=True),
    "a training budget that is not positive": Case(budget_not_positive, before_work=True),
    "a stage setting that does not exist": Case(unknown_stage_field, before_work=True),
    "a `--config` file that is not JSON or YAML": Case(config_file_not_json, before_work=True),
    "a stage the recipe does not run": Case(python_error(lambda: UPQConfig(recipe="rtn", ptq={"epochs": 3}))),
    "a setting of upq_hf 0.1 passed to `UPQConfig`": Case(python_error(lambda: UPQConfig(ptq_epochs=6))),
    "an unknown `scale_init`": Case(python_error(lambda: UPQConfig(rtn={"scale_init": "minmax"}))),
    "a `module_bits` pattern that is no regular expression": Case(python_error(lambda: UPQConfig(module_bits={"(": 4}))),
    "a `module_bits` width not 2 or 4": Case(python_error(lambda: UPQConfig(module_bits={"k_proj": 3}))),
    "a `module_bits` pattern that matches no layer": Case(pattern_matching_no_layer),
    "a `--module-bits` that is not PATTERN=BITS[:GROUP]": Case(module_bits_malformed, before_work=True),
    "`--mix` with `--bits 4`": Case(mix_at_4_bits, before_work=True),
    "a `mix` on a model whose layers it cannot place": Case(mix_without_its_layers),
    "a model with decoder weights UPQ cannot quantize": Case(unknown_decoder_weight),
    "a negative `teacher_topk`": Case(negative_teacher_topk, before_work=True),
    "a `samples` budget that is not positive": Case(python_error(
        lambda: UPQConfig(recipe="upq", distill={"samples": 0}))),
    "a `holdout` outside [0, 1)": Case(python_error(lambda: UPQConfig(recipe="ptq", ptq={"holdout": 1.0}))),
    "a model path that does not exist": Case(missing_model_path, before_work=True),
    "a folder that is not a saved model": Case(folder_without_model, before_work=True),
    "a file where the model folder should be": Case(file_instead_of_folder, before_work=True),
    "a Hub id with the Hub out of reach (offline, no network)": Case(hub_out_of_reach, before_work=True),
    "a recipe that needs data, on a folder without a tokenizer": Case(no_tokenizer, before_work=True),
    "`--device cuda` without a GPU": Case(device_cuda_cli, before_work=True),
    "`--backend triton` without a GPU": Case(backend_triton_cli, before_work=True),
    "`--backend avx2` where its kernel cannot be built": Case(backend_avx2_unbuildable_cli, before_work=True),
    "`--backend a8` on a CPU without AVX512-VNNI": Case(backend_a8_without_vnni_cli, before_work=True),
    "`quantize_model(..., device=\"cuda\")` without a GPU": Case(device_cuda_python),
    "`UPQConfig(backend=\"triton\")` without a GPU": Case(backend_triton_python),
    "`upq eval --device cuda` without a GPU": Case(eval_device_cuda, before_work=True),
    "`\"disk\"` in a `device_map`": Case(disk_in_device_map),
    "a data file that does not exist": Case(dataset_missing),
    "a data file without text": Case(dataset_empty),
    "a Hub dataset with the Hub out of reach": Case(hub_dataset_offline),
    "an existing `--out`": Case(out_exists, before_work=True),
    "`--out` is a file": Case(out_is_a_file, before_work=True),
    "`upq generate --engine native` on a family the native decoder does not run": Case(generate_native_other_family),
    "`NativeDecoder` on a model it does not run": Case(native_decoder_other_family),
    "`upq generate` asked for no new tokens": Case(generate_no_new_tokens, before_work=True),
    "`upq info` on a model that is not UPQ": Case(info_not_upq, before_work=True),
    "`upq info` on a folder that does not exist": Case(info_missing, before_work=True),
    "a truncated checkpoint file (CLI)": Case(corrupt_cli, before_work=True),
    "a truncated checkpoint file (loading)": Case(corrupt_python),
    "packed tensors that do not match config.json": Case(mismatched_python),
    "a checkpoint of a newer format version": Case(newer_format),
    "loading a UPQ checkpoint without `import upq_hf`": Case(without_import),
    "`upq push` without a network": Case(push_no_network, before_work=True),
    "`upq push` without a token": Case(push_no_token, before_work=True),
    "`upq push` with a token the Hub refuses": Case(push_refused_token, before_work=True),
    "`upq push` of a folder that is not UPQ": Case(push_not_upq, before_work=True),
    "an interrupted run (Ctrl-C)": Case(interrupted, code=130),
    "`--resume` with nothing to resume": Case(resume_with_nothing, code=0),
    "a run killed (SIGKILL) during Distill-QAT": Case(
        None, covered_by="test_sigkill_during_distill_qat_then_resume_matches_an_uninterrupted_run"),
    "a run killed inside the final save": Case(None, covered_by="test_sigkill_inside_the_save_leaves_no_half_written_folder"),
    "a run killed while replacing `--out`": Case(
        None, covered_by="test_sigkill_while_replacing_out_puts_the_old_checkpoint_back"),
}


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from upq_hf.models import load_tokenizer

    root = tmp_path_factory.mktemp("errors")
    tiny = root / "tiny"
    tiny_llama().save_pretrained(tiny)
    tokenizer = load_tokenizer(None)
    tinytok = root / "tinytok"
    tiny_llama(vocab_size=len(tokenizer), initializer_range=0.1).save_pretrained(tinytok)
    tokenizer.save_pretrained(tinytok)
    ckpt = root / "ckpt"
    upq_hf.quantize_model(tiny_llama(), UPQConfig(bits=2, group_size=32), progress=False).save_pretrained(ckpt)
    texts = root / "texts.txt"
    texts.write_text("\n".join(f"Note {i}: the level of the tank is {i * 7 % 13} units today." for i in range(16)))
    return {"tiny": str(tiny), "tinytok": str(tinytok), "ckpt": str(ckpt), "texts": str(texts)}


ROWS = readme_rows()


@pytest.mark.parametrize("what, example, seen", ROWS, ids=[re.sub(r"\W+", "-", r[0]).strip("-") for r in ROWS])
def test_readme_row(what, example, seen, shared, tmp_path, capsys, monkeypatch):
    case = CASES.get(what)
    assert case is not None, f"README row {what!r} has no case in tests/test_errors.py"
    if case.covered_by:
        import test_kill

        assert callable(getattr(test_kill, case.covered_by, None)), case.covered_by
        return
    spans = code_spans(seen)
    work = tmp_path / "case"
    work.mkdir()
    outcome = case.run(Context(work, shared, capsys, monkeypatch))

    def fill(text: str) -> str:
        for key, value in outcome.where.items():
            text = text.replace(f"<{key}>", value)
        return text

    if outcome.error is None:  # the CLI: the message is the whole stderr line
        message = fill(spans[0])
        lines = outcome.err.splitlines()
        assert outcome.code == case.code, outcome.err
        assert "Traceback" not in outcome.err
        assert message in lines, f"expected the line\n{message}\nin stderr:\n{outcome.err}"
        if message.startswith("upq: error:"):
            assert sum(line.startswith("upq: error:") for line in lines) == 1
        if case.before_work:
            assert lines == [message], outcome.err
    else:  # Python: the exception's class (or a base of it) and its message, exactly
        kind, message = spans[0], fill(spans[1])
        base = getattr(builtins, kind, None)
        assert isinstance(outcome.error, base), f"{type(outcome.error).__mro__} is no {kind}"
        assert str(outcome.error) == message


def test_every_case_has_a_readme_row_and_there_are_enough():
    whats = [r[0] for r in ROWS]
    assert len(whats) == len(set(whats)), "a README row appears twice"
    assert set(whats) == set(CASES), (sorted(set(CASES) - set(whats)), sorted(set(whats) - set(CASES)))
    assert len(ROWS) >= 20
