"""The streaming ``upq`` path (upq_hf.offload, upq_hf.streamed): a model's dense weights read from disk a block at
a time give the checkpoint of the in-memory recipe, bit for bit on a float32 checkpoint; a killed run resumes at
the next block; sources that cannot stream are named."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import upq_hf
from upq_hf import UPQConfig, offload, streamed
from upq_hf.models import load_tokenizer
from upq_hf.qat import QATLinear
from upq_hf.recipes import Run

from helpers import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [f"Item {i}: the {w} of the {v} is {i * 7 % 13} units; it changes every day, and nobody knows why."
         for i, (w, v) in enumerate([("height", "tree"), ("weight", "box"), ("price", "apple"), ("age", "cat")] * 6)]


def config(dataset=TEXTS, **kw):
    # unrotated: the in-memory path would turn the residual stream under rotation="auto", a streamed run cannot
    values = dict(bits=2, recipe="upq", group_size=32, int4_group_size=32, rotation=None,
                  data={"dataset": dataset, "calibration_samples": 8, "calibration_seqlen": 32, "prompts": 2},
                  ptq={"steps": 3}, distill={"steps": 2, "batch_size": 2, "seqlen": 32, "samples": 4})
    values.update(kw)
    return UPQConfig(**values)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def save_tiny(path, tokenizer, dtype=torch.float32, **overrides):
    model = tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=3, initializer_range=0.1, **overrides).to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny(tmp_path_factory.mktemp("tiny-fp32"), tokenizer)


def in_memory(path, tokenizer, cfg):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    upq_hf.quantize_model(model, cfg, tokenizer=tokenizer, progress=False)
    return model


def assert_same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_index_reads_every_tensor_as_safetensors_does(tmp_path, tokenizer):
    for dtype in (torch.float32, torch.bfloat16):
        path = save_tiny(tmp_path / str(dtype), tokenizer, dtype)
        index = offload.SafetensorsIndex.of_folder(path)
        expected = load_file(os.path.join(path, "model.safetensors"))
        assert set(index.entries) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(index.read(name), tensor), name
        assert index.dtype() == dtype
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as handle:  # truncated: the last tensors end past the file's end
        handle.truncate(os.path.getsize(file) - 1000)
    last = max(index.entries, key=lambda n: index.entries[n].end)
    with pytest.raises(OSError, match="truncated"):
        offload.SafetensorsIndex.of_folder(path).read(last)


def test_streamed_teacher_computes_the_dense_model(tiny_dir):
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    teacher = offload.skeleton(tiny_dir)
    store = offload.BlockStore(tiny_dir, teacher)
    ids = torch.randint(0, 1000, (2, 12))
    assert all(p.device.type == "meta" for p in store.layers.parameters())
    with store.streaming():
        out = teacher(input_ids=ids).logits
        generated = teacher.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, dense(input_ids=ids).logits)
    assert torch.equal(generated, dense.generate(ids, max_new_tokens=5, do_sample=False))
    assert all(p.device.type == "meta" for p in store.layers.parameters())  # dropped again after each forward
    from upq_hf.data.self_data import weights_fingerprint

    assert weights_fingerprint(teacher) == weights_fingerprint(dense)  # "self" data: one cache for both paths


def test_drop_latent_keeps_the_forward_and_the_scale_gradient():
    torch.manual_seed(0)
    layer = QATLinear.from_linear(torch.nn.Linear(64, 24), bits=2, group_size=32)
    layer.snap()
    x = torch.randn(5, 64)
    y = layer(x)
    y.square().sum().backward()
    grad = layer.weight_scale.grad.clone()
    layer.weight_scale.grad = None
    codes = layer.codes.clone()
    layer.drop_latent()
    assert layer.weight is None and layer.codes.dtype == torch.int32 and layer.codes.numel() == 24 * 64 // 16
    y2 = layer(x)
    y2.square().sum().backward()
    assert torch.equal(y, y2) and torch.equal(grad, layer.weight_scale.grad)
    assert torch.equal(layer.quantized_weight().codes, codes)
    assert torch.equal(layer.freeze().dequantize(torch.float32), layer.fake_quant_weight().detach())


def test_streamed_upq_is_the_in_memory_checkpoint_bit_for_bit(tiny_dir, tokenizer, tmp_path):
    cfg = config("self")  # the teacher's own answers: generated by the streamed teacher, block by block
    expected = in_memory(tiny_dir, tokenizer, cfg)
    model, teacher = streamed.quantize_streamed(tiny_dir, config("self"), Run(tokenizer=tokenizer))
    assert_same_state(model, expected)
    ids = torch.randint(0, 1000, (1, 10))
    assert torch.equal(model(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_streamed_e2e_qp_is_the_in_memory_one_bit_for_bit(tiny_dir, tokenizer):
    cfg = config(e2e_qp={"steps": 2})
    expected = in_memory(tiny_dir, tokenizer, cfg)
    model, _ = streamed.quantize_streamed(tiny_dir, config(e2e_qp={"steps": 2}), Run(tokenizer=tokenizer))
    assert_same_state(model, expected)
    without, _ = streamed.quantize_streamed(tiny_dir, config(), Run(tokenizer=tokenizer))
    assert not torch.equal(without.model.norm.weight, model.model.norm.weight)  # E2E-QP trained the norms further


@pytest.mark.parametrize("ptq", [{"int4_epochs": 0}, {"int4_epochs": 1}, {"int4_epochs": 1, "int2_target": "dense"}],
                         ids=["no-int4-stage", "int4-stage", "dense-target"])
def test_streamed_int4_stage_variants_are_the_in_memory_ones(tiny_dir, tokenizer, ptq):
    expected = in_memory(tiny_dir, tokenizer, config(ptq={"steps": 3, **ptq}))
    model, _ = streamed.quantize_streamed(tiny_dir, config(ptq={"steps": 3, **ptq}), Run(tokenizer=tokenizer))
    assert_same_state(model, expected)


def test_disk_rows_round_trip_bit_for_bit(tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        values = torch.randn(7, 5, 3).to(dtype)
        rows = offload.DiskRows.of(tmp_path / f"{dtype}.bin", values)
        assert os.path.getsize(rows.path) == values.numel() * values.element_size()
        assert rows.shape == (7, 5, 3) and len(rows) == 7 and rows.dtype == dtype
        assert torch.equal(rows[:], values) and torch.equal(rows[2:5], values[2:5]) and torch.equal(rows[6], values[6])
        index = torch.tensor([6, 0, 3, 3])
        assert torch.equal(rows[index], values[index])
        copy = rows.like(tmp_path / f"{dtype}-copy.bin", copy=True)
        rows[1:3] = torch.ones(2, 5, 3)
        assert torch.equal(copy.tensor(), values)  # a copy, not the same file
        assert torch.equal(rows[1:3], torch.ones(2, 5, 3, dtype=dtype)) and torch.equal(rows[3:], values[3:])
        assert torch.equal(rows.like(tmp_path / f"{dtype}-zeros.bin").tensor(), torch.zeros(7, 5, 3, dtype=dtype))
        with pytest.raises(IndexError, match="step 1"):
            rows[::2]
    with open(rows.path, "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(OSError, match="truncated"):
        rows[6]


@pytest.mark.parametrize("int4_epochs", [0, 1], ids=["default", "int4-stage"])
def test_a_killed_streamed_run_resumes_at_the_next_block(tiny_dir, tokenizer, tmp_path, monkeypatch, int4_epochs):
    work = str(tmp_path / "work")
    passes = ("int2", "int4") if int4_epochs else ("int2",)  # the INT4 stage's pass interleaves with INT2's

    def config_here(**ptq):
        return config(ptq={"steps": 3, "int4_epochs": int4_epochs, **ptq})

    expected, _ = streamed.quantize_streamed(tiny_dir, config_here(), Run(tokenizer=tokenizer))
    save = streamed._save

    def killed_after_two(folder, fingerprint, index, *args):
        save(folder, fingerprint, index, *args)
        if index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(streamed, "_save", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        streamed.quantize_streamed(tiny_dir, config_here(), Run(tokenizer=tokenizer, work_dir=work))
    monkeypatch.setattr(streamed, "_save", save)
    assert sorted(os.listdir(os.path.join(work, "stream"))) == ["activations-00002", "block-00000.safetensors",
                                                                "block-00001.safetensors", streamed.STATE]
    assert sorted(os.listdir(os.path.join(work, "stream", "activations-00002"))) == [
        f"{p}.{k}.bin" for p in passes for k in ("fp_inputs", "quant_inputs")]
    quantized = []
    from upq_hf.ptq import BlockwisePTQ

    original = BlockwisePTQ.quantize_block
    monkeypatch.setattr(BlockwisePTQ, "quantize_block",
                        lambda self, index, ref=None: quantized.append(index) or original(self, index, ref))
    resumed, _ = streamed.quantize_streamed(tiny_dir, config_here(), Run(tokenizer=tokenizer, work_dir=work,
                                                                          resume=True))
    assert quantized == [2] * len(passes)  # block 3 alone (INT4 then INT2 with the INT4 stage)
    assert_same_state(resumed, expected)
    quantized.clear()  # other settings: the kept blocks are not theirs
    streamed.quantize_streamed(tiny_dir, config_here(steps=2), Run(tokenizer=tokenizer, work_dir=work, resume=True))
    assert quantized == [index for index in (0, 1, 2) for _ in passes]


def test_sources_that_cannot_stream_say_why(tmp_path, tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=2)
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert "no safetensors weights (.bin)" in offload.stream_problem(str(tmp_path / "bin"))
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "model.gguf").write_bytes(b"GGUF")
    assert "no safetensors weights (.gguf)" in offload.stream_problem(str(tmp_path / "gguf"))
    assert "not a local folder" in offload.stream_problem(str(tmp_path / "missing"))
    from families import FAMILIES, build

    mixtral = build(next(f for f in FAMILIES if f.name == "Mixtral"))  # transformers 5 fuses the experts on load
    mixtral.save_pretrained(tmp_path / "moe")
    problem = offload.stream_problem(str(tmp_path / "moe"))
    assert problem and "not in the checkpoint under that name" in problem, problem
    on, why = streamed.choose(str(tmp_path / "moe"), config(), "cpu", "on")
    assert not on and why.startswith("in-memory path: the model cannot be streamed")
    assert streamed.choose(str(tmp_path / "moe"), config(), "cpu", "off") == (False, "in-memory path (--stream off)")
    with pytest.raises(ValueError, match="only recipe 'upq'"):
        streamed.choose(str(tmp_path / "moe"), config(recipe="ptq"), "cpu", "on")


def test_cli_streamed_and_in_memory_write_the_same_checkpoint_and_report(tiny_dir, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"group_size": 32, "int4_group_size": 32, "mix": None, "rotation": None,
                               "data": {"dataset": TEXTS, "calibration_samples": 8, "calibration_seqlen": 32},
                               "ptq": {"steps": 2}, "distill": {"steps": 1, "batch_size": 2, "seqlen": 32,
                                                                "samples": 2}}))
    outs, logs = {}, {}
    for stream in ("on", "off"):
        outs[stream] = tmp_path / stream
        result = subprocess.run([sys.executable, "-m", "upq_hf.cli", "quantize", tiny_dir, "--bits", "2", "--recipe",
                                 "upq", "--config", str(cfg), "--stream", stream, "--fidelity-prompts", "2", "--out",
                                 str(outs[stream])], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        logs[stream] = result.stderr
    assert "upq: streaming the model block by block from disk (--stream on)" in logs["on"]
    assert "upq: in-memory path (--stream off)" in logs["off"]
    on, off = (load_file(outs[s] / "model.safetensors") for s in ("on", "off"))
    assert sorted(on) == sorted(off) and all(torch.equal(on[k], off[k]) for k in on)
    reports = [json.loads((outs[s] / "upq_report.json").read_text()) for s in ("on", "off")]
    assert reports[0]["metrics"] == reports[1]["metrics"] and reports[0]["answers"] == reports[1]["answers"]
    assert 0 < reports[0]["metrics"]["fidelity_top1"] <= 1
    reloaded = AutoModelForCausalLM.from_pretrained(outs["on"])
    assert reloaded.model.layers[0].self_attn.q_proj.bits == 2


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_bf16_checkpoint_streams_in_bf16(tmp_path, tokenizer, precision):
    """With and without bf16 autocast: without it (a CPU with no native bf16) the float32 norms' output meets the
    bf16 head, which takes it in its own dtype."""
    path = save_tiny(tmp_path / "bf16", tokenizer, torch.bfloat16)
    distill = {"steps": 2, "batch_size": 2, "seqlen": 32, "samples": 4, "mixed_precision": precision}
    model, teacher = streamed.quantize_streamed(path, config(distill=distill), Run(tokenizer=tokenizer))
    assert not model.get_output_embeddings()._forward_pre_hooks  # the training-time cast is removed after it
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # what is not trained stays as the file has it
    assert model.model.norm.weight.dtype == torch.bfloat16  # trained in float32, then the model's dtype again
    assert model.model.layers[0].mlp.down_proj.bits == 2
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad(), teacher._upq_block_store.streaming():
        assert torch.equal(teacher(input_ids=ids).logits, dense(input_ids=ids).logits)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
