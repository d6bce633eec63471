"""The model card of a checkpoint made from the bundled model.

The bundled model is stood in for by a tiny Llama saved (with the bundled tokenizer) where the bundled
folder lives (``UPQ_CACHE``), so the real code paths run: ``upq quantize`` with no model, and
``from_pretrained`` + ``save_pretrained`` of that folder.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from transformers import AutoModelForCausalLM

from upq_hf import UPQConfig, cli
from upq_hf.models import BUNDLED_NAME, load_tokenizer
from upq_hf.publish import REPORT_FILE, base_model_of, record_report

from helpers import tiny_llama

BASE = f"HuggingFaceTB/{BUNDLED_NAME}"


@pytest.fixture(scope="module")
def bundled_cache(tmp_path_factory):
    """A cache folder whose ``SmolLM2-135M-Instruct`` is a tiny Llama speaking the bundled tokenizer."""
    tokenizer = load_tokenizer(None)
    cache = tmp_path_factory.mktemp("upq-cache")
    folder = cache / BUNDLED_NAME
    model = tiny_llama(vocab_size=len(tokenizer))
    model.config._name_or_path = BASE  # as bundled_model_dir writes it
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return cache


@pytest.fixture
def bundled(bundled_cache, monkeypatch):
    monkeypatch.setenv("UPQ_CACHE", str(bundled_cache))
    return bundled_cache / BUNDLED_NAME


def card_of(folder):
    text = (folder / "README.md").read_text()
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def check_card(folder):
    meta, body = card_of(folder)
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "quantized"
    title = body.strip().splitlines()[0]
    assert title == f"# {BUNDLED_NAME} - UPQ INT2 (SEQ, group size 32)", title
    assert "Model" not in title.split(" - ")[0]
    assert not re.search(r"https?://(www\.)?github\.com", body + str(meta)), "a link to a repository that does not exist"
    assert meta["upq"]["bits_per_weight"] == pytest.approx(2.5)
    return meta, body


@pytest.fixture(scope="module")
def cli_checkpoint(bundled_cache, tmp_path_factory):
    """``upq quantize`` with no model (the bundled one), once for the module."""
    out = tmp_path_factory.mktemp("cli") / "q"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UPQ_CACHE", str(bundled_cache))
        assert cli.main(["quantize", "--bits", "2", "--group-size", "32", "--fidelity-prompts", "0", "--device",
                         "cpu", "--out", str(out)]) == 0
    return out


def test_cli_card_of_the_bundled_model(cli_checkpoint):
    check_card(cli_checkpoint)
    assert json.loads((cli_checkpoint / REPORT_FILE).read_text())["base_model"] == BASE


def test_save_pretrained_card_of_the_bundled_folder(bundled, tmp_path):
    """``from_pretrained(<the bundled folder>)``: the folder's path says where it came from."""
    model = AutoModelForCausalLM.from_pretrained(bundled, quantization_config=UPQConfig(bits=2, group_size=32))
    model.save_pretrained(tmp_path / "q")
    check_card(tmp_path / "q")


def test_measured_numbers_reach_the_card(cli_checkpoint, tmp_path):
    """What the demo does after reloading: ``record_report`` merges the numbers and rewrites the card."""
    import shutil

    out = tmp_path / "q"
    shutil.copytree(cli_checkpoint, out)
    record_report(out, metrics={"fidelity_top1": 0.8125, "fidelity_prompts": 4})
    record_report(out, metrics={"fidelity_kl": 0.25})  # merged, not replaced
    meta, body = check_card(out)
    assert meta["upq"]["metrics"] == {"fidelity_top1": 0.8125, "fidelity_prompts": 4, "fidelity_kl": 0.25}
    assert "## Measured" in body and "| fidelity_top1 | 0.8125 |" in body and "| fidelity_kl | 0.25 |" in body
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["base_model"] == BASE and report["metrics"]["fidelity_top1"] == 0.8125


def test_base_model_of(bundled, tmp_path):
    assert base_model_of(None) is None and base_model_of("bundled") == BASE and base_model_of(str(bundled)) == BASE
    assert base_model_of("org/name") == "org/name"
    assert base_model_of(str(tmp_path)) is None  # a local folder tells nothing; the Hub refuses a path
    assert base_model_of("/no/such/folder") is None


def test_card_without_a_base_model_has_a_real_title(tmp_path):
    from upq_hf.publish import model_card

    body = model_card(UPQConfig(bits=4, group_size=None).to_dict()).split("---\n", 2)[2]
    assert body.strip().splitlines()[0] == "# UPQ INT4 (asymmetric, per-row scales) checkpoint"
