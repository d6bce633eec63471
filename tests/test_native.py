"""upq_hf.native.NativeDecoder: the decoder stack in one C++ call per token, against the model's own forward."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from upq_hf import UPQConfig, avx2, quantize_model
from upq_hf.machine import cpu_flags

from helpers import tiny_llama, tiny_qwen

pytestmark = pytest.mark.skipif(not avx2.has_op(), reason="native decode needs the CPU kernel's C++ operator")
VNNI = {"avx512f", "avx512bw", "avx512_vnni"} <= (cpu_flags() or set())


def tiny(family: str):
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return tiny_llama()
    if family == "qwen2":
        return tiny_qwen()
    if family == "qwen3":  # per-head norms of q and k, head_dim apart from hidden / heads
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)).eval()
    return MistralForCausalLM(MistralConfig(**common, sliding_window=8)).eval()  # a window shorter than the text


def quantized(family: str, **config):
    model = tiny(family)
    quantize_model(model, UPQConfig(**{"bits": 2, "group_size": 32, "recipe": "rtn", **config}), progress=False)
    return model


def reference(model, ids):
    """The model's fp32 forward on the exact ``torch`` backend (the automatic choice on a CPU with native bf16,
    torch's INT4 kernel, multiplies in bf16: 2e-3 apart, on a Sapphire Rapids Xeon)."""
    with torch.no_grad(), mock.patch.dict(os.environ, {"UPQ_BACKEND": "torch"}):
        return model(ids).logits[0].float()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_native_logits_equal_the_models_fp32_forward(family):
    """Exact kernel: the same logits as transformers' fp32 forward up to the order of fp32 sums (measured 2e-7 on
    these models); the prompt in one call, in two chunks, or a token at a time gives the same."""
    from upq_hf.native import NativeDecoder

    model = quantized(family)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = reference(model, ids)
    decoder = NativeDecoder(model, max_length=32, int8_activations=False)
    whole = decoder.forward(ids[0], last=0)
    assert whole.shape == expected.shape
    assert (whole - expected).abs().max() < 1e-4
    decoder.reset()
    first = decoder.forward(ids[0, :7], last=0)
    rest = torch.cat([decoder.forward(ids[0, i:i + 1]) for i in range(7, 20)])
    assert (torch.cat([first, rest]) - expected).abs().max() < 1e-4
    decoder.reset()
    assert torch.equal(decoder.forward(ids[0], last=3), whole[-3:])


def test_a_prompt_longer_than_one_chunk():
    """Prompts run in calls of CHUNK rows; the second chunk's rows see the first's keys."""
    from upq_hf.native import CHUNK, NativeDecoder

    model = quantized("llama")
    ids = torch.randint(0, 128, (1, CHUNK + 9), generator=torch.Generator().manual_seed(4))
    expected = reference(model, ids)
    got = NativeDecoder(model, max_length=CHUNK + 16, int8_activations=False).forward(ids[0], last=0)
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4


def test_dense_and_int4_layers_run_too():
    """Layers the kernel reads (INT2, INT4 with zero points) and dense ones (an unquantized model) in one path."""
    from upq_hf.native import NativeDecoder

    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    for model in (tiny("llama"), quantized("llama", bits=4, group_size=32)):
        expected = reference(model, ids)
        got = NativeDecoder(model, max_length=16, int8_activations=False).forward(ids[0], last=0)
        assert (got - expected).abs().max() < 1e-4


@pytest.mark.skipif(not VNNI, reason="int8 activations need AVX512-VNNI")
def test_int8_activations_stay_within_their_rounding():
    """The a8 trade: activations rounded to int8 per group; on the tiny model within 0.02 of logits of up to ~1.4
    (measured 0.005), and the same numbers as the model's own a8 layers would give to that tolerance."""
    from upq_hf.native import NativeDecoder

    model = quantized("llama")
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = reference(model, ids)
    got = NativeDecoder(model, max_length=32, int8_activations=True).forward(ids[0], last=0)
    assert 0 < (got - expected).abs().max() < 0.02


def test_generate_is_greedy_on_the_models_own_logits():
    """Greedy decode: every new token is the argmax of transformers' fp32 forward over the sequence so far (the
    prompt kept in front); it stops at an end token; a request bigger than the cache makes a bigger cache; sampling
    keeps the prompt and its length. (``model.generate`` itself is not the yardstick: its cached steps round
    differently from its own full forward, and on a random tiny model near-ties flip.)"""
    from upq_hf.native import NativeDecoder

    model = quantized("qwen2")
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    decoder = NativeDecoder(model, max_length=8, int8_activations=False)
    got = decoder.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert got.shape == (1, 21) and torch.equal(got[:, :9], ids)
    assert decoder.max_length == 21
    logits = reference(model, got)
    for i in range(8, 20):
        top = logits[i].topk(2)
        assert int(got[0, i + 1]) == int(top.indices[0]) or top.values[0] - top.values[1] < 1e-4
    stop = int(got[0, 9 + 4])
    first = next(i for i in range(9, 21) if int(got[0, i]) == stop)
    assert torch.equal(decoder.generate(ids, max_new_tokens=12, eos_token_id=stop), got[:, :first + 1])
    sampled = decoder.generate(ids, max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9,
                               generator=torch.Generator().manual_seed(0), eos_token_id=[])
    assert sampled.shape == (1, 14) and torch.equal(sampled[:, :9], ids)


def test_what_it_does_not_run_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    from upq_hf.native import NativeDecoder, native_problem

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    assert "gpt2" in native_problem(gpt2)
    with pytest.raises(ValueError, match="families"):
        NativeDecoder(gpt2)
    model = quantized("llama")
    decoder = NativeDecoder(model, max_length=8, int8_activations=False)
    with pytest.raises(ValueError, match="cache holds 8"):
        decoder.forward(torch.arange(9))
    with pytest.raises(ValueError, match="one sequence"):
        decoder.generate(torch.zeros(2, 3, dtype=torch.long))
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(quantized("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge or unload adapters"):
        NativeDecoder(wrapped.base_model.model)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny INT2 Llama checkpoint that speaks the bundled tokenizer (its chat template included)."""
    from upq_hf.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    model = tiny_llama(vocab_size=len(tokenizer))
    quantize_model(model, UPQConfig(bits=2, group_size=32, recipe="rtn"), progress=False)
    folder = tmp_path_factory.mktemp("chat-int2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_upq_generate_streams_an_answer_with_the_native_decoder(chat_checkpoint, capsys):
    from upq_hf import cli

    assert cli.main(["generate", chat_checkpoint, "--prompt", "Name a colour.", "--max-new-tokens", "6",
                     "--dtype", "float32", "--backend", "avx2"]) == 0
    err = capsys.readouterr().err
    assert "upq: native decode;" in err and "new in" in err
    assert cli.main(["generate", chat_checkpoint, "--prompt", "Name a colour.", "--max-new-tokens", "6",
                     "--engine", "transformers", "--temperature", "0.8"]) == 0
    assert "upq: transformers generate;" in capsys.readouterr().err


def test_upq_generate_native_on_a_family_it_does_not_run_exits_2(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from upq_hf import cli
    from upq_hf.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer), n_positions=64)
                    ).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    capsys.readouterr()
    assert cli.main(["generate", str(tmp_path), "--prompt", "Hi", "--engine", "native"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("upq: error: --engine native: native decode runs the llama") 
    assert cli.main(["generate", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "0"]) == 2


def test_install_routes_the_calls_it_can_and_leaves_the_rest_to_transformers(monkeypatch):
    """``install``: a one-sequence greedy ``model.generate`` call runs natively (the decoder's tokens, the same
    as calling it directly); a batch, beams or a penalty go to transformers' generate, untouched; uninstall undoes
    it."""
    from upq_hf import native

    model = quantized("qwen2")
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    transformers_generate = model.generate
    direct = native.NativeDecoder(model, int8_activations=False).generate(ids, max_new_tokens=6, eos_token_id=[])
    native.install(model, int8_activations=False)
    calls = []
    decoder = model.generate.native_decoder
    real = decoder.generate
    monkeypatch.setattr(decoder, "generate", lambda **kw: calls.append(kw) or real(**kw))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=6)
        assert torch.equal(got, direct) and len(calls) == 1
        assert model.generate(input_ids=ids, max_length=12, do_sample=True, top_k=5).shape == (1, 12)
        assert len(calls) == 2 and calls[-1]["top_k"] == 5 and calls[-1]["max_new_tokens"] == 3
        batch = torch.cat([ids, ids])
        assert torch.equal(model.generate(batch, max_new_tokens=3, pad_token_id=0),
                           transformers_generate(batch, max_new_tokens=3, pad_token_id=0))
        model.generate(ids, max_new_tokens=3, num_beams=2, pad_token_id=0)
        model.generate(ids, max_new_tokens=3, repetition_penalty=1.2, pad_token_id=0)
    assert len(calls) == 2
    native.uninstall(model)
    assert "generate" not in model.__dict__
