"""Killed, not only interrupted: real ``upq quantize`` subprocesses stopped with SIGKILL.

* during Distill-QAT: ``--resume`` continues from the last complete trainer checkpoint (a checkpoint left
  half-written by a kill in the middle of saving is passed over) and ends with the very weights of an
  uninterrupted run;
* inside the final save: ``--out`` does not exist, and the next run removes the killed run's temporary;
* between moving the old ``--out`` aside and the new one in (``--overwrite``): the next run puts the old
  checkpoint back.

The runs go through ``tests/slow_cli.py``: ``upq_hf.cli.main`` with a pause after each training step (so
that the kill lands between two saves) or inside a save (so that it lands there); nothing else differs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from upq_hf import cli
from upq_hf.resume import last_complete_checkpoint

HERE = Path(__file__).parent
TEXTS = [f"Note {i}: the {w} of the {v} is {i * 7 % 13} units, and it keeps changing every day."
         for i, (w, v) in enumerate([("height", "tree"), ("weight", "box"), ("price", "apple"), ("age", "cat")] * 6)]
STEPS = 6  # UPQ saves a trainer checkpoint every max(1, steps // 4) = 1 step


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with the bundled tokenizer saved beside it, and a text file to train on."""
    from helpers import tiny_llama
    from upq_hf.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    path = tmp_path_factory.mktemp("tiny-with-tokenizer")
    tiny_llama(vocab_size=len(tokenizer), initializer_range=0.1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path.parent / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return path


def quantize_argv(model_dir: Path, out: Path) -> list[str]:
    stages = model_dir.parent / "stages.json"
    stages.write_text(json.dumps({"int4_group_size": 32, "data": {"calibration_samples": 4, "calibration_seqlen": 32},
                                  "ptq": {"epochs": 1, "int4_epochs": 1}, "distill": {"steps": STEPS, "batch_size": 2, "seqlen": 32,
                                                                    "samples": 8}}))
    return ["quantize", str(model_dir), "--bits", "2", "--group-size", "32", "--recipe", "upq",
            "--dataset", str(model_dir.parent / "texts.txt"), "--config", str(stages), "--fidelity-prompts", "0",
            "--device", "cpu", "--out", str(out)]


def start(argv: list[str], **env) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1",
                   **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, str(HERE / "slow_cli.py"), *argv], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (status {process.returncode}) before the kill:\n"
                                 f"{process.stderr.read()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the moment to kill")
        time.sleep(0.02)


def kill9(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return err


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return err


def test_sigkill_during_distill_qat_then_resume_matches_an_uninterrupted_run(model_dir, tmp_path):
    reference = tmp_path / "reference"
    finish(start(quantize_argv(model_dir, reference)))

    out = tmp_path / "killed"
    trainer_dir = Path(f"{out}.work") / "trainer"
    process = start(quantize_argv(model_dir, out), UPQ_TEST_STEP_PAUSE=0.5)
    # the state file written through, not merely opened: under load a kill between the two left checkpoint-2
    # incomplete, and the resumed run (rightly) started over
    checkpoint_2 = str(trainer_dir / "checkpoint-2")
    wait_for(lambda: last_complete_checkpoint(trainer_dir, remove_incomplete=False) == checkpoint_2, process)
    kill9(process)  # in step 3: checkpoint-2 is complete, checkpoint-3 not begun
    assert not out.exists() and Path(f"{out}.work", "int4", "int4_stage.safetensors").is_file()
    assert not (trainer_dir / "checkpoint-3").exists()
    # a kill in the middle of the next save would have left checkpoint-3 without its trainer state
    partial = trainer_dir / "checkpoint-3"
    shutil.copytree(trainer_dir / "checkpoint-2", partial)
    (partial / "trainer_state.json").write_text('{"global_step": 3, "log_hist')

    err = finish(start(quantize_argv(model_dir, out) + ["--resume"]))
    assert f"resuming from {trainer_dir / 'checkpoint-2'}" in err and "restarting from the INT4 stage kept in" in err
    expected, resumed = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == resumed.keys() and any(k.endswith("q_proj.weight") for k in expected)
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert different == []
    assert not Path(f"{out}.work").exists()  # removed once the run succeeded


def test_sigkill_inside_the_save_leaves_no_half_written_folder(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(model_dir), "--bits", "2", "--group-size", "32", "--fidelity-prompts", "0", "--out",
            str(out)]
    process = start(argv, UPQ_TEST_PAUSE_IN="save")
    wait_for(lambda: any(p.name.startswith(".q.tmp-") and (p / "model.safetensors").is_file()
                         for p in tmp_path.iterdir()), process)
    time.sleep(0.2)
    kill9(process)
    assert not out.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".q.tmp-{process.pid}-")  # what SIGKILL cannot clean up
    assert cli.main(argv) == 0  # the next run removes the killed run's temporary
    capsys.readouterr()
    assert [p.name for p in tmp_path.iterdir()] == ["q"] and (out / "model.safetensors").is_file()
    assert cli.main(["info", str(out)]) == 0


def test_sigkill_while_replacing_out_puts_the_old_checkpoint_back(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(model_dir), "--bits", "2", "--group-size", "32", "--fidelity-prompts", "0", "--out",
            str(out)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    process = start(argv[:3] + ["4"] + argv[4:] + ["--overwrite"], UPQ_TEST_PAUSE_IN="replace")
    wait_for(lambda: not out.exists(), process)  # the old folder is moved aside, the new one not yet in
    kill9(process)
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".q.old", ".q.tmp"]
    code = cli.main(argv)  # without --overwrite: the old checkpoint is back, so it refuses to replace it
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_last_complete_checkpoint_passes_over_a_half_written_one(tmp_path):
    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, state in [(2, {"global_step": 2}), (4, {"global_step": 4}), (6, None), (8, "truncated")]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state == "truncated":
            (folder / "trainer_state.json").write_text('{"global_step": 8, "lo')
        elif state is not None:
            (folder / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / "checkpoint-10").write_text("not a folder")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2", "checkpoint-4"]
