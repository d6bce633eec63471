"""UPQDistillTrainer under DDP: 2 CPU processes (gloo) launched by torch.distributed.run, no code of ours."""

import json
import os
import subprocess
import sys


def test_distill_trainer_runs_ddp_on_two_cpu_processes(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "ddp_distill.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             script, "--out", str(tmp_path), "--steps", "3"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [3, 3]
    # DDP averaged the gradients: both replicas hold the same trained weights
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["train_loss"] > 0
