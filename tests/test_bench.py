"""bench/: the GPU script's CPU smoke run passes (every stage at a tiny shape), without the packages
the GPU image lacks (datasets, math_verify, bitsandbytes are made unimportable), so it cannot rot."""
import os
import shutil

import pytest

from conftest import ROOT, run_cli


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_script_smoke_runs_without_the_missing_packages(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    for m in ("datasets", "math_verify", "bitsandbytes"):
        (block / f"{m}.py").write_text('raise ImportError("not installed on the GPU image")\n')
    out = tmp_path / "out"
    p = run_cli(["bash", "bench/gpu.sh", "--smoke"], env={"OUT": str(out), "PYTHONPATH": f"{block}{os.pathsep}{ROOT}"},
                timeout=1800, check=False)
    log = (out / "gpu.log").read_text()
    assert p.returncode == 0, log[-6000:]
    for stage in ("versions", "audit", "kernels-compile", "rollout-check", "rollout-1.5b", "kernels", "sft-sdpa",
                  "rl-step",
                  "family-tiny-llama"):
        assert f"=== {stage}: rc 0" in log, stage
    assert "check: greedy engine == generate on 4/4 rows" in log
    assert "decode (engine)" in log and "capture-safe" in log and "0 failure(s)" in log
    rows = [line.split() for line in log.splitlines() if line.startswith("engine.generate ")]
    assert len(rows) == 2 and all(float(r[3]) > 0 for r in rows), rows  # x eager, the engine timed first
    assert "graphs captured" in log
