"""The `upq` command line: quantize and info on a tiny model, clear errors, atomic writes."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from upq_hf import cli
from upq_hf.convert import upq_layers


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_then_info(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "int2"
    code, stdout, _ = run(capsys, "quantize", tiny_llama_dir, "--bits", "2", "--group-size", "32",
                          "--dtype", "float16", "--out", str(out))
    assert code == 0
    assert "bits per weight       2.500" in stdout  # 2 + 16 / 32
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(upq_layers(model)) == 14 and model.model.embed_tokens.weight.dtype == torch.float16
    assert upq_layers(model)["model.layers.0.mlp.up_proj"].weight_scale.dtype == torch.float16
    code, stdout, _ = run(capsys, "info", str(out), "--json")
    info = json.loads(stdout)
    assert info["quantization_config"]["bits"] == 2 and len(info["layers"]) == 14
    # per block: q, o 64x64; k, v 32x64 (2 kv heads of 16); gate, up 128x64; down 64x128
    assert info["quantized_weights"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64) == 73728
    code, stdout, _ = run(capsys, "info", str(out), "--layers")
    assert "model.layers.1.mlp.down_proj" in stdout


def test_per_row_int4(tiny_llama_dir, tmp_path, capsys):
    code, stdout, _ = run(capsys, "quantize", tiny_llama_dir, "--bits", "4", "--group-size", "row",
                          "--out", str(tmp_path / "q"))
    assert code == 0 and "per-row" in stdout


@pytest.mark.parametrize("argv,match", [
    (["--bits", "4", "--group-size", "48"], "group_size=48 does not divide"),
    (["--bits", "2", "--group-size", "0"], "group_size must be a positive integer"),
    (["--bits", "2", "--device", "cuda"], "needs a CUDA GPU"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_llama_dir, tmp_path, capsys, argv, match):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this check is about machines without a GPU")
    out = tmp_path / "never"
    code, _, err = run(capsys, "quantize", tiny_llama_dir, *argv, "--out", str(out))
    assert code == 2 and match in err and err.count("upq: error") == 1
    assert not out.exists() and os.listdir(tmp_path) == []


def test_bad_bits_rejected_by_parser(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", tiny_llama_dir, "--bits", "3", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err


def test_existing_output_needs_overwrite(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "--bits", "2", "--out", str(out))
    assert code == 2 and "already exists" in err and (out / "keep.txt").read_text() == "mine"
    code, _, _ = run(capsys, "quantize", tiny_llama_dir, "--bits", "2", "--out", str(out), "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_interrupted_save_leaves_no_checkpoint(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def save_then_die(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)  # files are written...
        raise KeyboardInterrupt  # ...then the run is interrupted before the rename

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_die)
    code, _, err = run(capsys, "quantize", tiny_llama_dir, "--bits", "2", "--out", str(tmp_path / "q"))
    assert code == 130 and "no checkpoint was written" in err
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary folder


def test_info_on_non_upq_folder(tiny_llama_dir, capsys):
    code, _, err = run(capsys, "info", tiny_llama_dir)
    assert code == 2 and "not a UPQ checkpoint" in err


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "older-checkpoint"])
def test_info_reports_the_true_in_features_of_a_padded_layer(tmp_path, capsys, recorded):
    """down_proj has in_features 90: six INT2 words of 16 codes (96 slots) per row, the last one padded."""
    import safetensors.torch

    import upq_hf
    from helpers import tiny_llama

    model = upq_hf.quantize_model(tiny_llama(intermediate_size=90), upq_hf.UPQConfig(bits=2, group_size=None),
                                  progress=False)
    model.save_pretrained(tmp_path)
    down = "model.layers.0.mlp.down_proj"
    assert upq_layers(model)[down].weight.shape == (6, 64)
    if not recorded:  # as saved before the header recorded in_features: the architecture tells it
        path = tmp_path / "model.safetensors"
        tensors = safetensors.torch.load_file(path)
        safetensors.torch.save_file(tensors, path, metadata={"format": "pt", "upq_format_version": "1"})
    code, stdout, _ = run(capsys, "info", str(tmp_path), "--json")
    info = json.loads(stdout)
    assert code == 0 and info["layers"][down]["in_features"] == 90 and info["layers"][down]["out_features"] == 64
    assert info["layers"]["model.layers.0.mlp.up_proj"]["in_features"] == 64
    # per block: q, o 64x64; k, v 32x64; gate, up 90x64; down 64x90
    assert info["quantized_weights"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 90 * 64) == 59136
    code, stdout, _ = run(capsys, "info", str(tmp_path), "--layers")
    assert f"{down:48s} INT2     64 x 90     groups 1" in stdout


@pytest.mark.parametrize("visible", [True, False])
def test_quantize_device_defaults_to_cuda_where_a_gpu_is_visible(tiny_llama_dir, tmp_path, monkeypatch, visible):
    seen = {}

    def stop(args, config, device):
        seen["device"] = device
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
    monkeypatch.setattr(cli, "_check_before_work", stop)
    assert cli.main(["quantize", tiny_llama_dir, "--bits", "2", "--out", str(tmp_path / "q")]) == 130
    assert seen["device"] == ("cuda" if visible else "cpu")
    monkeypatch.setattr(cli, "_check_before_work", stop)
    cli.main(["quantize", tiny_llama_dir, "--bits", "2", "--device", "cpu", "--out", str(tmp_path / "q")])
    assert seen["device"] == "cpu"  # what the user says wins
