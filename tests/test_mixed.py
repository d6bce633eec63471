"""Mixed bits per module (``UPQConfig(module_bits=...)``): resolution, errors, and every path of a mixed model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import upq_hf  # noqa: F401  registers quant_method "upq"
from upq_hf import UPQConfig, quantize_model
from upq_hf.checkpoint import checkpoint_info
from upq_hf.convert import linear_layers, upq_layers
from upq_hf.packing import bits_per_weight

from helpers import tiny_llama

KV4 = {r"\.(k|v)_proj$": 4}
IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 3]])


def test_layer_format_first_matching_pattern_decides():
    config = UPQConfig(bits=2, group_size=32, int4_group_size=16,
                       module_bits={r"layers\.0\.mlp\.down_proj": {"bits": 2, "group_size": 16}, "down_proj": 4,
                                    r"\.v_proj$": {"bits": 4, "group_size": 32}})
    assert config.layer_format("model.layers.0.mlp.down_proj") == (2, 16)  # first pattern wins
    assert config.layer_format("model.layers.1.mlp.down_proj") == (4, 16)  # INT4 without a group: int4_group_size
    assert config.layer_format("model.layers.1.self_attn.v_proj") == (4, 32)
    assert config.layer_format("model.layers.1.self_attn.q_proj") == (2, 32)  # no pattern: the default


@pytest.mark.parametrize("module_bits, match", [
    ({"(": 4}, "not a regular expression"),
    ({"k_proj": 3}, "bits must be one of"),
    ({"k_proj": {"bits": 4, "group": 32}}, "is bits or"),
    ({"k_proj": {"bits": 4, "group_size": 0}}, "group_size must be a positive integer"),
    (["k_proj"], "must map name patterns"),
])
def test_bad_module_bits_are_refused_at_once(module_bits, match):
    with pytest.raises(ValueError, match=match):
        UPQConfig(module_bits=module_bits)


def test_a_pattern_that_matches_no_layer_is_an_error():
    with pytest.raises(ValueError, match="matches none of the 14 layers.*model.layers.0.self_attn.q_proj"):
        quantize_model(tiny_llama(), UPQConfig(bits=2, group_size=16, module_bits={"kv_proj": 4}))


def test_mixed_model_saves_reloads_bit_identical_and_reports_its_bits(tmp_path):
    model = tiny_llama()
    quantize_model(model, UPQConfig(bits=2, group_size=16, int4_group_size=32, module_bits=KV4))
    layers = upq_layers(model)
    assert {name: (m.bits, m.group_size) for name, m in layers.items() if m.bits == 4} == {
        f"model.layers.{i}.self_attn.{p}_proj": (4, 32) for i in range(2) for p in "kv"}
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    # saved as ordered pairs: transformers writes config.json with sorted keys
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["module_bits"] == [
        [pattern, spec] for pattern, spec in KV4.items()]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert {n: m.bits for n, m in upq_layers(reloaded).items()} == {n: m.bits for n, m in layers.items()}
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, logits)
    info = checkpoint_info(str(tmp_path))
    assert sorted(e["bits"] for e in info["layers"].values()) == [2] * 10 + [4] * 4
    # hidden 64, kv out 32: INT4 layers 64 x 32 at g32 (scale + zero), INT2 layers at g16 (scale)
    n4, n2 = 4 * 64 * 32, info["quantized_weights"] - 4 * 64 * 32
    expected = (n4 * bits_per_weight(4, 32, 64) + n2 * bits_per_weight(2, 16, 64)) / (n4 + n2)
    assert info["bits_per_weight"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("config", [
    # overlapping patterns whose order matters: sorted, "\\.(k|v)_proj$" would come first and take v_proj to INT4
    dict(bits=2, group_size=16, module_bits={r"\.v_proj$": 2, r"\.(k|v)_proj$": 4}),
    # the kv4 mix: its catch-all "." sorts before "\\.(k|v)_proj$" and would take k/v back to INT2
    dict(bits=2, group_size=16, mix="kv4"),
], ids=["overlapping", "kv4"])
def test_pattern_order_survives_config_json(tiny_llama_dir, tmp_path, config):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=UPQConfig(**config)).eval()
    formats = {n: (m.bits, m.group_size) for n, m in upq_layers(model).items()}
    kinds = {(n.rsplit(".", 1)[1], f) for n, f in formats.items()}
    if "mix" in config:
        assert model.config.quantization_config.module_bits == {r"\.(k|v)_proj$": 4, ".": {"bits": 2, "group_size": 32}}
        assert {k for k, f in kinds if f[0] == 4} == {"k_proj", "v_proj"} and (("q_proj", (2, 32)) in kinds)
    else:
        assert ("v_proj", (2, 16)) in kinds and ("k_proj", (4, None)) in kinds
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert {n: (m.bits, m.group_size) for n, m in upq_layers(reloaded).items()} == formats
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, logits)


def test_mixed_quantize_on_load(tiny_llama_dir, tmp_path):
    config = UPQConfig(bits=2, group_size=16, module_bits={"down_proj": {"bits": 4, "group_size": 32}})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    assert {n: (m.bits, m.group_size) for n, m in upq_layers(model).items() if "down_proj" in n} == {
        "model.layers.0.mlp.down_proj": (4, 32), "model.layers.1.mlp.down_proj": (4, 32)}
    assert all(m.bits == 2 for n, m in upq_layers(model).items() if "down_proj" not in n)


def test_mixed_recipe_ptq_trains_each_layer_in_its_format():
    from upq_hf.models import load_tokenizer

    tokenizer = load_tokenizer(None)  # the bundled model's
    texts = [f"Note {i}: the level of the tank is {i * 7 % 13} units today." for i in range(16)]
    config = UPQConfig(bits=2, group_size=16, recipe="ptq", module_bits=KV4,
                       data={"dataset": texts, "calibration_samples": 4, "calibration_seqlen": 16}, ptq={"epochs": 1})
    model = tiny_llama(vocab_size=len(tokenizer))
    quantize_model(model, config, tokenizer=tokenizer, progress=False)
    assert sorted({(m.bits, m.group_size) for m in upq_layers(model).values()}) == [(2, 16), (4, None)]


def test_ptq_report_names_each_format_of_a_mixed_model():
    from upq_hf.ptq import blockwise_ptq
    from upq_hf.stages import PTQConfig

    model = tiny_llama()
    formats = {name: (4, 32) for name in linear_layers(model) if name.endswith(("k_proj", "v_proj"))}
    calibration = torch.randint(0, 128, (4, 16))
    report = blockwise_ptq(model, calibration, 2, 16, PTQConfig(steps=1), progress=False, layer_formats=formats)
    assert f"{len(linear_layers(tiny_llama())) - 4} layers INT2 g16, 4 layers INT4 g32:" in str(report)
    plain = blockwise_ptq(tiny_llama(), calibration, 2, 16, PTQConfig(steps=1), progress=False)
    assert str(plain).startswith("PTQ INT2 g16: 2 blocks")


# ---------------------------------------------------------------------------------------------- named mixes
def _llama_names(n_blocks: int) -> list[str]:
    kinds = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return [f"model.layers.{i}.{kind}" for i in range(n_blocks) for kind in kinds]


def _shapes(names, hidden=576, kv=192, ffn=1536):
    """``{name: layer}`` with the bundled SmolLM2-135M's shapes (or the ones given)."""
    from types import SimpleNamespace

    size = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn), "down_proj": (ffn, hidden)}
    return {n: SimpleNamespace(in_features=size[n.rsplit(".", 1)[1]][0], out_features=size[n.rsplit(".", 1)[1]][1])
            for n in names}


def _average_bits(formats, layers, config):
    from upq_hf.packing import bits_per_weight

    total = sum(m.in_features * m.out_features for m in layers.values())
    return sum(m.in_features * m.out_features * bits_per_weight(*formats.get(n, (config.bits, config.group_size)),
                                                                m.in_features) for n, m in layers.items()) / total


@pytest.mark.parametrize("hidden, kv, ffn, group_size, bulk", [
    (576, 192, 1536, 64, 192),     # the bundled SmolLM2-135M: the measured 2.23-bit default (docs/BENCHMARKS.md)
    (4096, 1024, 14336, 64, 128),  # a Llama-3-8B-shaped block: GQA, k/v 4% of the weights
    (576, 192, 1536, 32, 64),      # a finer uniform budget (2.5 bits): a finer bulk group holds it
    (4096, 4096, 11008, 64, 256),  # multi-head k/v (17%): no group holds 2.25, so the widest dividing one
])
def test_kv4_mix_holds_the_uniform_budget(hidden, kv, ffn, group_size, bulk):
    layers = _shapes(_llama_names(4), hidden, kv, ffn)
    config = UPQConfig(bits=2, group_size=group_size, mix="kv4")
    formats = config.layer_formats(layers)
    assert {n for n, f in formats.items() if f[0] == 4} == {n for n in layers if n.endswith(("k_proj", "v_proj"))}
    assert {f for f in formats.values() if f[0] == 2} == {(2, bulk)}
    assert config.module_bits == {r"\.(k|v)_proj$": 4, ".": {"bits": 2, "group_size": bulk}}
    uniform = _average_bits({}, layers, config)
    mixed = _average_bits(formats, layers, config)
    if hidden == 4096 and kv == 4096:
        assert mixed > uniform  # said in budget_group_size's docstring: the mix then costs more
    else:
        assert mixed <= uniform
        # and the next finer dividing group would break the budget: the bulk group is the smallest that holds it
        finer = [g for g in range(group_size, bulk, group_size) if hidden % g == 0 and ffn % g == 0]
        if finer:
            over = {n: ((2, finer[-1]) if f[0] == 2 else f) for n, f in formats.items()}
            assert _average_bits(over, layers, config) > uniform


def test_kv4_mix_keeps_a_group_size_that_fits_nothing():
    # 48 divides no layer of 64 inputs and no multiple of it does: the bulk keeps 48 and the usual error follows
    layers = _shapes(_llama_names(1), hidden=64, kv=32, ffn=128)
    config = UPQConfig(bits=2, group_size=48, mix="kv4")
    assert config.layer_formats(layers) == {n: (4, 64) for n in layers if n.endswith(("k_proj", "v_proj"))}
    assert config.module_bits == {r"\.(k|v)_proj$": 4}


def test_kv4_mix_needs_shapes_and_kv_layers():
    with pytest.raises(ValueError, match="needs the layers' shapes"):
        UPQConfig(mix="kv4").layer_formats(_llama_names(2))
    with pytest.raises(ValueError, match="give module_bits patterns"):
        UPQConfig(mix="kv4").layer_formats(_shapes(["model.layers.0.mlp.down_proj"]))


def test_mix_patterns_come_after_the_given_ones_and_resolve_once():
    config = UPQConfig(bits=2, group_size=64, mix="kv4", module_bits={r"\.v_proj$": 2})
    layers = _shapes(_llama_names(30))
    formats = config.layer_formats(layers)
    assert "model.layers.5.self_attn.v_proj" not in formats  # the given pattern wins: v_proj stays at the default
    assert formats["model.layers.5.self_attn.k_proj"] == (4, 64)
    resolved = dict(config.module_bits)
    assert list(resolved)[0] == r"\.v_proj$"
    assert UPQConfig.from_dict(config.to_dict()).layer_formats(layers) == formats  # a reloaded config resolves alike
    config.resolve_mix(layers)
    assert config.module_bits == resolved
    # the same config object on other shapes: their own bulk group, none of the first model's left behind
    config.layer_formats(_shapes(_llama_names(2), hidden=4096, kv=1024, ffn=14336))
    assert config.module_bits == {r"\.v_proj$": 2, r"\.(k|v)_proj$": 4, ".": {"bits": 2, "group_size": 128}}


def test_mix_refuses_int4_unknown_names_and_layers_it_cannot_place():
    with pytest.raises(ValueError, match="mix must be one of"):
        UPQConfig(mix="q2k")
    with pytest.raises(ValueError, match="needs bits=2"):
        UPQConfig(bits=4, mix="kv4")
    with pytest.raises(ValueError, match="give module_bits patterns"):
        UPQConfig(mix="kv4").layer_formats(_shapes(["model.layers.0.mlp.down_proj"]))
    with pytest.raises(ValueError, match="mix 'kv-edge' is retired"):  # a retired mix for a new model
        UPQConfig(mix="kv-edge")


def test_a_checkpoint_of_a_retired_mix_still_loads(tmp_path):
    """kv-edge is retired; a checkpoint made with it holds its resolved patterns and loads as it was."""
    model = tiny_llama()
    kv_edge = {r"\.(k|v)_proj$": 4, r"layers\.(0|1)\.mlp\.down_proj$": 4}
    quantize_model(model, UPQConfig(bits=2, group_size=16, int4_group_size=32, mix=None, module_bits=kv_edge))
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    saved["quantization_config"]["mix"] = "kv-edge"  # as upq_hf 0.1 wrote it
    path.write_text(json.dumps(saved))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.quantization_config.mix == "kv-edge"
    assert {n for n, m in upq_layers(reloaded).items() if m.bits == 4} == {
        n for n, m in upq_layers(model).items() if m.bits == 4}
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, logits)


def test_mixed_model_from_a_mix_saves_and_reloads(tmp_path, capsys):
    model = tiny_llama()
    quantize_model(model, UPQConfig(bits=2, group_size=16, int4_group_size=32, mix="kv4"))
    expected = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kv"}
    layers = upq_layers(model)
    assert {name for name, m in layers.items() if m.bits == 4} == expected
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["mix"] == "kv4"
    assert saved["module_bits"][0] == [r"\.(k|v)_proj$", 4]
    assert "Mixed-precision preset `kv4`" in (tmp_path / "README.md").read_text()  # the model card
    from upq_hf import cli

    assert cli.main(["info", str(tmp_path)]) == 0
    assert "quantized layers      14  (mixed: 10 at INT2, 4 at INT4, preset kv4)" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert {n: (m.bits, m.group_size) for n, m in upq_layers(reloaded).items()} == {
        n: (m.bits, m.group_size) for n, m in layers.items()}
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, logits)


@pytest.mark.parametrize("argv, mix", [
    (["--bits", "2", "--recipe", "upq"], "kv4"),  # the default of the pipeline this package exists for
    (["--bits", "2", "--recipe", "upq", "--mix", "none"], None),  # uniform INT2 on request
    (["--bits", "2", "--recipe", "ptq"], None),  # the baselines and round to nearest stay uniform unless asked
    (["--bits", "2"], None),
    (["--bits", "4", "--recipe", "ptq"], None),
    (["--bits", "2", "--recipe", "ntp", "--mix", "kv4"], "kv4"),
])
def test_cli_and_python_default_mix_agree(argv, mix):
    from upq_hf.cli import build_config, build_parser

    args = build_parser().parse_args(["quantize", *argv, "--out", "q"])
    assert build_config(args).mix == mix
    bits, recipe = args.bits, args.recipe or "rtn"
    if "--mix" not in argv:  # the same default in Python
        assert UPQConfig(bits=bits, recipe=recipe).mix == mix
