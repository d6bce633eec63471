"""The residual rotation (upq_hf.rotation): orthogonal matrices of the widths models use, the rotated model computes
the dense model's function, families it cannot rotate are named."""

import pytest
import torch

from upq_hf import rotation

from families import FAMILIES, build

ROTATABLE = ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi-3", "Granite")


@pytest.mark.parametrize("n, hadamard", [(64, True), (576, True), (960, True), (2048, True), (3072, True),
                                         (896, False), (10, False)])
def test_orthogonal_matrices_of_model_widths(n, hadamard):
    q = rotation.orthogonal(n, seed=3)
    assert q.dtype == torch.float64 and q.shape == (n, n)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    h = rotation.hadamard(n, seed=3)
    assert (h is not None) == hadamard
    if hadamard:  # every entry +-1/sqrt(n): each output mixes every input equally
        assert torch.equal(h, q) and torch.allclose(h.abs(), torch.full_like(h, n ** -0.5), atol=1e-15)
        assert not torch.equal(rotation.hadamard(n, seed=4), h)  # the signs come from the seed


@pytest.mark.parametrize("name", ROTATABLE)
def test_rotated_model_computes_the_same_logits(name):
    family = next(f for f in FAMILIES if f.name == name)
    model = build(family).float()
    with torch.no_grad():  # norms that are not all ones, so that folding them matters
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5)
    ids = torch.randint(3, 128, (2, 11))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        embed = model.get_input_embeddings().weight.clone()
        q = rotation.rotate_residual(model, seed=1)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert torch.allclose(model.get_input_embeddings().weight.double(), embed.double() @ q, atol=1e-6)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and m.weight.shape[0] == 64]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.weight if hasattr(model.model.layers[0].mlp,
                              "down_proj") else torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize("name, words", [("GPT-2", "not a decoder"), ("Gemma2", "RMSNorm"), ("OLMo2", "RMSNorm"),
                                         ("Mixtral", "experts")])
def test_families_that_cannot_rotate_say_why(name, words):
    model = build(next(f for f in FAMILIES if f.name == name))
    problem = rotation.rotation_problem(model)
    assert problem is not None and words in problem
    with pytest.raises(ValueError, match="cannot rotate this model"):
        rotation.rotate_residual(model)


def test_rotated_upq_checkpoint_saves_and_reloads(tmp_path, tiny_llama_dir):
    """quantize_model with a rotation: the rotated, quantized model saves as a plain UPQ checkpoint (untied head,
    norms of one) that from_pretrained reloads bit for bit; on load, round to nearest with a rotation loads the dense
    model first and gives the same model as quantize_model."""
    import upq_hf
    from transformers import AutoModelForCausalLM

    from upq_hf import UPQConfig

    config = dict(bits=2, group_size=32, recipe="rtn", rotation="hadamard", seed=5)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    upq_hf.quantize_model(model, UPQConfig(**config), progress=False)
    ids = torch.randint(3, 100, (1, 9))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.config.quantization_config.rotation == "hadamard"
    assert reloaded.config.tie_word_embeddings is False
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)
    on_load = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32,
                                                   quantization_config=UPQConfig(**config))
    with torch.no_grad():
        assert torch.equal(on_load(input_ids=ids).logits, logits)
    unrotated = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32,
                                                     quantization_config=UPQConfig(bits=2, group_size=32))
    with torch.no_grad():
        assert not torch.equal(unrotated(input_ids=ids).logits, logits)


def test_rotation_setting_is_checked_and_never_streams(tiny_llama_dir):
    from upq_hf import UPQConfig, offload

    with pytest.raises(ValueError, match="rotation must be one of"):
        UPQConfig(rotation="random")
    problem = offload.stream_problem(tiny_llama_dir, UPQConfig(bits=2, recipe="upq", rotation="hadamard"))
    assert "rotation" in problem


def test_rotation_auto_turns_upq_at_int2_where_the_model_and_the_path_allow(tiny_llama_dir):
    """``rotation="auto"``: the Hadamard turn for recipe upq at INT2 on the default grid where the model can be
    rotated and is quantized in memory; None for other recipes, bits and grids, for families that cannot rotate
    (with the reason) and for a streamed run. It is the default; a saved config.json without the key reads as
    None (written before the rotation existed)."""
    from upq_hf import UPQConfig, offload, streamed

    assert UPQConfig(bits=2, recipe="upq").rotation == "auto"
    assert UPQConfig(bits=2, recipe="upq", rotation=None).rotation is None
    for other in (dict(bits=2, recipe="rtn"), dict(bits=4, recipe="ptq"), dict(bits=2, recipe="distill"),
                  dict(bits=2, recipe="upq", group_size=16, mix=None, scale_grid="q2_k")):
        assert UPQConfig(rotation="auto", **other).rotation is None, other
    assert UPQConfig.from_dict({"quant_method": "upq", "bits": 2, "recipe": "upq"}).rotation is None
    assert UPQConfig.from_dict({"quant_method": "upq", "bits": 2, "recipe": "upq", "rotation": "hadamard"}).rotation \
        == "hadamard"

    llama, gpt2 = (build(next(f for f in FAMILIES if f.name == name)) for name in ("Llama", "GPT-2"))
    config = UPQConfig(bits=2, recipe="upq", rotation="auto")
    assert rotation.resolve(llama, config) == ("hadamard", None) and config.rotation == "hadamard"
    config = UPQConfig(bits=2, recipe="upq", rotation="auto")
    turned, why = rotation.resolve(gpt2, config)
    assert turned is None and config.rotation is None and "not a decoder" in why
    assert rotation.resolve(gpt2, UPQConfig(bits=2, recipe="upq", rotation=None)) == (None, None)

    assert offload.stream_problem(tiny_llama_dir, UPQConfig(bits=2, recipe="upq", rotation="auto")) is None
    on, why = streamed.choose(tiny_llama_dir, UPQConfig(bits=2, recipe="upq", rotation="auto"), "cpu", "on")
    assert on and "unrotated (rotation auto" in why
    on, why = streamed.choose(tiny_llama_dir, UPQConfig(bits=2, recipe="upq", rotation=None), "cpu", "on")
    assert on and "unrotated" not in why



@pytest.mark.parametrize("argv, turned", [
    (["--bits", "2", "--recipe", "upq"], "auto"),  # the default, resolved per model when quantizing
    (["--bits", "2", "--recipe", "upq", "--rotation", "auto"], "auto"),  # resolved per model when quantizing
    (["--bits", "2", "--recipe", "upq", "--rotation", "none"], None),
    (["--bits", "2", "--recipe", "rtn", "--rotation", "auto"], None),
    (["--bits", "2", "--recipe", "upq", "--rotation", "hadamard"], "hadamard"),
    (["--bits", "2", "--recipe", "ptq"], None),
    (["--bits", "2", "--recipe", "ptq", "--rotation", "hadamard"], "hadamard"),  # asked for: any recipe takes it
    (["--bits", "4"], None),
])
def test_cli_and_python_default_rotation_agree(argv, turned):
    from upq_hf import UPQConfig
    from upq_hf.cli import build_config, build_parser

    args = build_parser().parse_args(["quantize", *argv, "--out", "q"])
    assert build_config(args).rotation == turned
    if "--rotation" not in argv:
        assert UPQConfig(bits=args.bits, recipe=args.recipe or "rtn").rotation == turned
