"""Every Triton kernel variant and configuration compiles for sm_80 and sm_90, without a GPU.

``python -m upq_kernels.aot`` (kernels/upq_kernels/aot.py) runs each variant's host code on CPU stand-ins of the
real shapes, records the launch, specialises it as Triton's JIT would and compiles it with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` down to a cubin; a case fails
if it does not compile or needs more shared memory than the target allows. conftest.py sets
``TRITON_INTERPRET=1`` for the interpreter tests, under which ``@triton.jit`` gives interpreter objects
that cannot be compiled, so the compilation runs in subprocesses without that variable (two, one per
core; Triton's on-disk cache makes later runs fast: cold, about 4.8 minutes of CPU time for the 122 cubins,
so 2-3 minutes on 2 idle cores; seconds warm). The timeout is a guard against a hang, not a budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from upq_kernels import aot, dispatch  # noqa: E402


def clean_env() -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_case_set_holds_every_configuration_of_every_variant():
    cases = aot.cases("quick")
    for name, module in dispatch.VARIANTS.items():
        for config in [module.DEFAULT_CONFIG] + module.CONFIGS:
            unfitted = [c for c in cases if c.variant == name and c.bits == 2 and c.group_size is None
                        and c.dtype == "bf16" and all(c.config_dict[key] == value for key, value in config.items())]
            assert unfitted, f"{name} config {config} is not compiled in its own form"
    branches = {(c.variant, c.bits, c.group_size, c.dtype, c.bias, c.K) for c in cases if c.is_default}
    for name in dispatch.VARIANTS:
        for bits, group, dtype, bias, K, _ in aot.BRANCHES:
            assert (name, bits, group, dtype, bias, K) in branches


def test_specialisation_matches_tritons_jit():
    """Our signature/constexpr/attribute rules against Triton's own binder, for every launch of the full set."""
    script = ("import json, upq_kernels.aot as aot; print(json.dumps(aot.check_specialisation('full')))")
    done = subprocess.run([sys.executable, "-c", script], env=clean_env(), capture_output=True, text=True, timeout=300)
    if done.returncode and "no create_function_from_signature" in done.stderr:
        pytest.skip(f"Triton {triton.__version__} has no JIT binder to compare with")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_every_variant_and_configuration_compiles_for_sm80_and_sm90(tmp_path):
    jobs = max(1, min(2, os.cpu_count() or 1))
    out = tmp_path / "aot.json"
    done = subprocess.run([sys.executable, "-m", "upq_kernels.aot", "--jobs", str(jobs), "--json", str(out)],
                          env=clean_env(), capture_output=True, text=True, timeout=1200)
    assert out.exists(), done.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    failed = [f"sm_{r['arch']} {r['case']['variant']} {r['case']['config']}: {r['problems'] or r['error']}"
              for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert done.returncode == 0, done.stderr[-4000:]
    expected = {(c.variant, c.config, c.bits, c.group_size, c.dtype, c.bias, arch)
                for c in aot.cases("quick") for arch in aot.ARCHS}
    compiled = {(r["case"]["variant"], tuple(sorted(r["case"]["config"].items())), r["case"]["bits"],
                 r["case"]["group_size"], r["case"]["dtype"], r["case"]["bias"], r["arch"]) for r in results}
    assert compiled == expected
    for r in results:  # what the compiler reports is there and plausible
        assert 0 < r["registers"] <= 255 and r["local_bytes"] >= 0 and r["shared_bytes"] >= 0
        assert r["num_warps"] == r["case"]["config"].get("num_warps", 4)


def test_refuses_to_run_under_the_interpreter():
    if not aot.INTERPRETER:
        pytest.skip("this process imported the kernels without the interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.run("quick", [90])
