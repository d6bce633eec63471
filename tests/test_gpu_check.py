"""examples/gpu_check.py, the one-command GPU check, in its CPU dry run (tiny shapes, the kernels under
Triton's interpreter): every part runs, writes its tables and JSON, and the kernel cases pass. The real
run needs a CUDA GPU; these tests are not evidence of its numbers, only of its code paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_dry_run_runs_every_part_and_writes_the_report(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["errors"] == {} and report["skipped"] == []
    assert report["environment"]["dry_run"] and report["environment"]["interpreter"]
    parts = report["parts"]
    assert parts["distributed"] == {"skipped": "0 GPUs visible: DDP and FSDP need 2"}  # a CPU: nothing to launch
    correctness = parts["correctness"]
    assert correctness["failed"] == 0 and correctness["total"] == 12
    assert {c["variant"] for c in correctness["cases"]} == {"gemv", "splitk", "tiled", "dequant"}
    assert all(c["error"] < 2e-2 and c["border_intact"] and c["unwritten"] == 0 for c in correctness["cases"])
    grid = parts["grid"]["rows"]
    assert [(r["M"], r["variant"]) for r in grid] == [(1, "gemv"), (16, "splitk")]
    assert all(r["upq_us"] > 0 and r["bf16_us"] > 0 and r["target"] in (4.5, 3.0) for r in grid)
    decode = parts["decode"]["rows"]
    assert [r["model"] for r in decode] == ["bf16", "INT2 per-row", "INT2 g128"]
    assert all(r["decode_tokens_per_s"] > 0 and r["compile"] == "none" for r in decode)
    assert parts["train"]["tokens_per_second"] > 0 and parts["train"]["shape"] == "tiny"
    markdown = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## correctness", "## grid", "## decode", "## train"):
        assert heading in markdown
    assert "12 of 12 cases pass" in markdown


def test_precompile_covers_what_the_tuner_will_try():
    """The compile workers of a real run launch, for every grid and decode shape, each candidate
    configuration of the variant the dispatcher picks: the tuner then finds every binary compiled."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(EXAMPLES))
    from upq_kernels.common import PackedWeight
    from upq_kernels.dispatch import VARIANTS, choose_variant

    launches = gpu_check.kernel_launches(gpu_check.REAL)
    by_case = {}
    for bits, group, K, N, M, variant, config in launches:
        by_case.setdefault((bits, group, K, N, M), []).append((variant, config))
    for K, N in gpu_check.REAL["shapes"]:
        for bits, group in gpu_check.REAL["formats"].values():
            for M in gpu_check.REAL["grid_rows"]:
                stand_in = PackedWeight(torch.empty(1, N, dtype=torch.int32), None, None, bits, group, K)
                variant = choose_variant(M, stand_in)
                tried = by_case[bits, group, K, N, M]
                assert {v for v, _ in tried} == {variant}
                if variant != "dequant":
                    module = VARIANTS[variant]
                    needed = {tuple(sorted(module.fit_config(c, M, stand_in).items())) for c in module.CONFIGS}
                    got = {tuple(sorted(module.fit_config(c, M, stand_in).items())) for _, c in tried}
                    assert needed <= got
    assert any(M == gpu_check.REAL["decode"]["prompt"] for _, _, _, _, M, _, _ in launches)
