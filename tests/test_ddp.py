"""Distill-QAT under DDP: 2 CPU processes (gloo) launched by torch.distributed.run, no code of ours; the trained
scales and norms equal one process's with the same global batch. And under torch's FSDP2 (``fully_shard``), which
accelerate enables on accelerators only: the Trainer's own loss and optimizer driven a step at a time on sharded
parameters (tests/fsdp2_cpu.py) train what the Trainer trains on one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "distributed_distill.py")
FSDP2 = os.path.join(os.path.dirname(__file__), "fsdp2_cpu.py")


def launch(out, processes: int, *args, script=SCRIPT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, script] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), script]
    return subprocess.run([*command, "--out", str(out), "--steps", "3", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.parametrize("train", ["scales", "weights"])
def test_ddp_on_two_cpu_processes_trains_what_one_process_trains(tmp_path, train):
    for name, processes in (("one", 1), ("ddp", 2)):
        result = launch(tmp_path / name, processes, "--train", train)
        assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [3, 3]
    assert ranks[0]["wrapper"] == "DistributedDataParallel"
    one, ddp = load_file(tmp_path / "one" / "trained.safetensors"), load_file(tmp_path / "ddp" / "trained.safetensors")
    assert sorted(one) == sorted(ddp) and any(k.endswith("weight_scale") for k in one)
    # the same global batch of 4 split 2 + 2: the gradients differ only in the order of a sum (float32); Adam's
    # normalised step carries that to 2e-6 at most here: 1e-5 is a ten-thousandth of a quantization step (~0.1)
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-5, msg=key)
    before = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert abs(ranks[0]["train_loss"] - before["train_loss"]) < 1e-5 * before["train_loss"]


def test_fsdp_on_cpu_processes_is_a_clear_refusal(tmp_path):
    result = launch(tmp_path, 2, "--fsdp")
    assert result.returncode != 0
    assert "accelerate enables FSDP on GPUs" in result.stderr


def test_fsdp2_on_two_cpu_processes_trains_what_one_process_trains(tmp_path):
    for name, processes, script in (("trainer", 1, SCRIPT), ("one", 1, FSDP2), ("fsdp2", 2, FSDP2)):
        result = launch(tmp_path / name, processes, script=script)
        assert result.returncode == 0, result.stderr[-3000:]
    trainer, one, fsdp2 = (load_file(tmp_path / name / "trained.safetensors") for name in ("trainer", "one", "fsdp2"))
    assert sorted(trainer) == sorted(one) == sorted(fsdp2) and any(k.endswith("weight_scale") for k in one)
    for key in trainer:  # the step-by-step driver is the Trainer's training loop, bit for bit
        assert torch.equal(one[key], trainer[key]), key
    ranks = [json.loads((tmp_path / "fsdp2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sharded"] and r["world_size"] == 2 for r in ranks)  # DTensor parameters, gathered to compare
    for key in one:  # as DDP above: the order of a sum, carried by Adam (1.2e-7 measured)
        torch.testing.assert_close(fsdp2[key], one[key], rtol=1e-5, atol=1e-5, msg=key)
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())["losses"]
    for step, loss in enumerate(single):  # each process's loss is the mean over its half of the batch
        assert abs((ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2 - loss) < 1e-6 * loss
