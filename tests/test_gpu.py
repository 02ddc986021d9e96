"""What a GPU box needs, proven without one: requirements.txt resolves against the CUDA wheel of torch
(its Requires-Dist, read from the registry); every Triton kernel compiles for sm_80 and sm_90 without
spills (bench/compile_kernels.py, offline, with the ptxas the triton wheel ships); engine.py's decode
step is capture-safe (bench/audit_step.py: no host sync, no data-dependent size, no host tensor, the
same ops and shapes at every step of one bucket); the engine's attention layouts; no silent CPU run on
a GPU machine; uneven waits across ranks that outlast the collective timeout."""
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli, torchrun

import common
import engine
import errors
import preflight

sys.path.insert(0, str(ROOT / "bench"))
import audit_step  # noqa: E402


# --- 1. requirements.txt against the CUDA wheel's metadata ---------------------------------------------

def pins():
    """{name: version} of the `name==version` lines of requirements.txt (extras and markers dropped)."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;#]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(3)
    return out


NETWORK_ERRORS = ("Could not fetch URL", "NewConnectionError", "Network is unreachable", "Temporary failure in name",
                  "Name or service not known", "ConnectTimeout", "ReadTimeout", "Connection refused", "ProxyError",
                  "connection broken", "No route to host", "Max retries exceeded")


def cuda_wheel_metadata(version, tmp_path):
    """The metadata pip reads for torch==version as a Linux x86-64 / Python 3.12 machine would install it
    from PyPI (the CUDA build): pip's own resolver, no install, only the registry (--isolated: no local
    wheels or indexes). fast-deps reads the wheel's metadata by HTTP range requests (a few MB, not the
    whole wheel); pip without it downloads the wheel. None with the reason when the registry is out of reach."""
    base = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--no-deps", "--ignore-installed",
            "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.12",
            "--target", str(tmp_path / "t"), f"torch=={version}", "--report", str(tmp_path / "r.json")]
    log = ""
    for extra in (["--use-feature=fast-deps"], []):
        p = subprocess.run(base + extra, capture_output=True, text=True, timeout=900)
        if p.returncode == 0:
            return json.loads((tmp_path / "r.json").read_text())["install"][0]["metadata"], None
        log = p.stdout + p.stderr
        if any(e in log for e in NETWORK_ERRORS):
            return None, f"the package registry is unreachable: {log.strip().splitlines()[-1][:300]}"
    raise AssertionError(f"pip could not resolve torch=={version} for Linux x86-64:\n{log[-3000:]}")


def test_requirements_agree_with_the_cuda_wheel_of_torch(tmp_path):
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    ours = pins()
    assert "torch" in ours and "triton" in ours
    meta, why = cuda_wheel_metadata(ours["torch"], tmp_path)
    if meta is None:
        print(f"SKIPPED: {why}")
        pytest.skip(why)
    env = {**default_environment(), "platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64",
           "python_version": "3.12", "python_full_version": "3.12.0", "extra": ""}
    needs = [Requirement(r) for r in meta["requires_dist"]]
    needs = [r for r in needs if r.marker is None or r.marker.evaluate(env)]
    checked = []
    for r in needs:
        name = r.name.lower().replace("_", "-")
        if name in ours:
            assert r.specifier.contains(ours[name], prereleases=True), \
                f"requirements.txt pins {name}=={ours[name]}, torch {ours['torch']}'s CUDA wheel requires {r}"
            checked.append(f"{name}=={ours[name]} satisfies {r}")
    assert any(c.startswith("triton==") for c in checked), f"the CUDA wheel names no triton: {meta['requires_dist']}"
    print("\n".join(checked))


# --- 2. every kernel compiles for sm_80 and sm_90 -------------------------------------------------------

def compile_kernels(*args):
    p = run_cli([sys.executable, "bench/compile_kernels.py", *args], timeout=900, check=False)
    if p.stdout.startswith("SKIP:"):
        pytest.skip(p.stdout.strip())
    print(p.stdout[-6000:])
    return p


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    p = compile_kernels()
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("_")]
    seen = {(r[0], r[1], r[2]) for r in rows}
    for kernel in ("_fwd_kernel", "_bwd_kernel"):
        for arch in ("sm_80", "sm_90"):
            for dt in ("bf16", "fp16", "fp32"):
                assert (kernel, arch, dt) in seen, (kernel, arch, dt)
    assert all(r[-2] == "0" for r in rows), "spills"  # the spills column
    assert "0 failure(s)" in p.stdout


def test_compile_check_catches_spills():
    p = compile_kernels("--arch", "90", "--dtypes", "fp32", "--vocab", "151936", "--maxnreg", "24")
    assert p.returncode == 1 and "SPILLS" in p.stdout, p.stdout[-3000:]


# --- 3. the decode step is capture-safe -----------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_decode_step_is_capture_safe(family, device):
    for temperature, top_p in audit_step.SAMPLERS:
        ops, problems = audit_step.audit(audit_step.tiny_model(family, device), temperature=temperature, top_p=top_p)
        assert not problems, (family, device, temperature, top_p, problems)
        names = " ".join(op for op, _, _ in ops)
        assert "embedding" in names and ("scaled_dot_product" in names or "bmm" in names)  # meta: sdpa's math ops


PLANTS = {  # name: (what is planted after the logits, what the CPU audit names, devices it is planted on)
    "item": (lambda z: z + 0 * z.max().item(), "_local_scalar_dense", ("cpu", "meta")),
    "tolist": (lambda z: z if z.argmax(-1).tolist() else z, "tolist", ("cpu", "meta")),
    "host tensor": (lambda z: z + torch.tensor([0.0]), "lift_fresh", ("cpu", "meta")),
    "python data": (lambda z: z + torch.tensor([0.0], device=z.device), "lift_fresh", ("cpu",)),
    "nonzero": (lambda z: z.index_fill(1, (z[0] > 1e9).nonzero()[:, 0], 0.0), "nonzero", ("cpu", "meta")),
    "boolean mask": (lambda z: z + 0 * z[z > 0].sum(), "boolean-mask", ("cpu", "meta")),
}


@pytest.mark.parametrize("plant,device", [(p, d) for p, (_, _, ds) in PLANTS.items() for d in ds])
def test_audit_catches_a_planted_sync(plant, device, monkeypatch):
    fn, name, _ = PLANTS[plant]
    logits = engine.Decoder.logits
    monkeypatch.setattr(engine.Decoder, "logits", lambda self, x: fn(logits(self, x)))
    _, problems = audit_step.audit(audit_step.tiny_model("qwen2", device))
    assert problems, plant
    if device == "cpu":  # real data: the op itself is named; on meta it may raise first (also a finding)
        assert any(name in p for p in problems), problems


def test_audit_catches_ops_that_change_between_steps(monkeypatch):
    logits, calls = engine.Decoder.logits, []

    def every_other_step(self, x):
        calls.append(1)
        z = logits(self, x)
        return z * 1.0 if len(calls) % 2 == 0 else z

    monkeypatch.setattr(engine.Decoder, "logits", every_other_step)
    _, problems = audit_step.audit(audit_step.tiny_model("qwen2", "cpu"))
    assert any("differs between steps" in p for p in problems), problems


# --- 4. the attention layouts ----------------------------------------------------------------------------

def test_decode_attention_equals_grouped_query_sdpa():
    """Folding the query heads of a KV head into the query length is the same math as enable_gqa."""
    g = torch.Generator().manual_seed(0)
    B, H, KV, Lb, hd = 3, 12, 2, 40, 16
    q, K, V = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((B, H, 1, hd), (B, KV, Lb, hd), (B, KV, Lb, hd)))
    mask = torch.arange(Lb)[None, :] <= torch.tensor([5, 39, 17])[:, None]  # (B, Lb)
    ref = torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=mask[:, None, None], scale=0.3,
                                                           enable_gqa=True)
    torch.testing.assert_close(engine.decode_attention(q, K, V, mask[:, None, None], 0.3), ref, rtol=1e-12, atol=1e-12)


def test_prefill_attention_equals_the_masked_form_on_real_tokens():
    """Right-padded prompts: is_causal alone gives every real query what the explicit mask gives."""
    g = torch.Generator().manual_seed(1)
    B, H, KV, P, hd = 3, 4, 2, 9, 8
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((B, H, P, hd), (B, KV, P, hd), (B, KV, P, hd)))
    lens = torch.tensor([9, 4, 1])
    pos = torch.arange(P)
    mask = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < lens[:, None, None])  # (B, P, P)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=0.5, enable_gqa=True)
    out = engine.prefill_attention(q, k, v, 0.5)
    for b, n in enumerate(lens.tolist()):
        torch.testing.assert_close(out[b, :, :n], ref[b, :, :n], rtol=1e-12, atol=1e-12)


def test_engine_logs_its_attention_route_once(capsys, monkeypatch):
    monkeypatch.setattr(engine, "_logged", set())  # as in a fresh process
    model = audit_step.tiny_model("qwen2", "cpu")
    for _ in range(2):
        engine.generate(model, [[5, 6, 7]], max_new_tokens=3, stop_ids=[], pad_id=0, len_bucket=8, check_every=2)
    err = capsys.readouterr().err
    assert err.count("engine: attention on cpu torch.float32: decode ") == 1, err
    assert engine.last_call["rows"] == 1 and engine.last_call["graphs"] == 0


# --- 5. no silent CPU run on a GPU machine; long waits that outlast the collective timeout ---------------


@pytest.fixture
def no_usable_gpu(monkeypatch):
    """This machine as a GPU box whose GPU torch cannot use: CUDA 13 torch, driver 535, nothing visible."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(preflight, "nvidia_driver", lambda: "535.104.05")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_a_gpu_machine_without_a_usable_gpu_stops_with_the_cause(no_usable_gpu, monkeypatch):
    for device in ("auto", "cuda"):
        with pytest.raises(errors.UsageError) as e:
            common.resolve_device(device)
        msg = str(e.value)
        assert "535.104.05" in msg and "CUDA 13.0" in msg and ">= 580" in msg and "--device cpu" in msg, msg
    assert common.resolve_device("cpu") == "cpu"  # asked for: runs on the CPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(errors.UsageError, match="CUDA_VISIBLE_DEVICES=''"):
        common.resolve_device("auto")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(errors.UsageError, match="CPU-only build"):
        common.resolve_device("cuda")


def test_a_machine_without_nvidia_runs_on_the_cpu_unless_cuda_is_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(preflight, "nvidia_driver", lambda: None)
    assert common.resolve_device("auto") == "cpu"
    with pytest.raises(errors.UsageError, match="--device cuda.*no NVIDIA driver"):
        common.resolve_device("cuda")


def test_adamw8bit_without_a_cuda_device_or_bitsandbytes_stops_with_the_cause(monkeypatch):
    with pytest.raises(errors.UsageError, match="adamw8bit needs a CUDA device"):
        preflight.check_optimizer("adamw8bit", "cpu")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # its import raises ImportError
    with pytest.raises(errors.UsageError, match="adamw8bit needs bitsandbytes"):
        preflight.check_optimizer("adamw8bit", "cuda")
    with pytest.raises(errors.UsageError, match="--optim must be adamw or adamw8bit, got 'sgd'"):
        preflight.check_optimizer("sgd", "cpu")


def test_nvidia_driver_version_is_read_from_proc(monkeypatch, tmp_path):
    for line, want in (("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023",
                        "535.104.05"),
                       ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build", "580.65.06")):
        f = tmp_path / "version"
        f.write_text(line + "\nGCC version: gcc 12\n")
        real_open = open
        monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(f if p == "/proc/driver/nvidia/version" else p,
                                                                          *a, **k))
        assert preflight.nvidia_driver() == want
        monkeypatch.undo()


def test_stage_cli_with_device_cuda_and_no_gpu_stops_before_loading(tiny_model, sft_rows, tmp_path):
    out = tmp_path / "out"
    p = run_cli([sys.executable, "sft.py", "--model", tiny_model, "--data", sft_rows, "--out", str(out),
                 "--device", "cuda"], check=False, timeout=300)
    assert p.returncode == 2 and "--device cuda, but torch sees no usable GPU" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not out.exists()
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(errors.UsageError, match="--dist-timeout must be a positive number"):
            common.init_dist("cpu", timeout_min=bad)


def test_init_dist_binds_the_gpu_and_sets_the_timeout(monkeypatch):
    """The CUDA branch, with torch.cuda and init_process_group stood in: NCCL gets device_id and timeout."""
    from datetime import timedelta
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls.setdefault("init", (backend, kw)))
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "16")
    d = common.init_dist("auto", timeout_min=90)
    assert d == common.Dist(11, 3, 16, torch.device("cuda", 3))
    assert calls["set_device"] == torch.device("cuda", 3)
    want = {"timeout": timedelta(minutes=90), "device_id": torch.device("cuda", 3)}
    assert calls["init"] == ("cuda:nccl,cpu:gloo", want)
    monkeypatch.setenv("LOCAL_RANK", "8")
    with pytest.raises(errors.UsageError, match="local rank 8 but torch sees 8 GPU"):
        common.init_dist("cuda")


def test_uneven_waits_outlast_a_short_collective_timeout(tiny_model, tmp_path):
    """2 gloo ranks, a 5 s timeout, 6.5 s of imbalance: a rank without a grading shard gathering while another
    grades, ranks 1..N while rank 0 loads the checkpoint, ranks 1..N while rank 0 hashes the model and
    compacts evaluate.py's records (they wait in common.barrier, not inside the broadcast of its verdict);
    the same wait inside a collective is stopped."""
    p = run_cli(torchrun(2) + ["tests/dist/wait_check.py", tiny_model, str(tmp_path / "o")], timeout=300)
    log = p.stdout
    for r in (0, 1):
        assert f"rank {r}: gathered [0, 1] after a slower rank's grading" in log, log
        assert f"rank {r}: built the policy while rank 0 loaded slowly (weights agree: True)" in log, log
        assert f"rank {r}: resumed [] after rank 0's slow fingerprint" in log, log
    assert "a collective wait past the timeout stopped" in log, log


def test_free_memory_counts_what_the_allocator_holds_unused(monkeypatch):
    """The KV cache may take the driver's free memory plus the caching allocator's reserved-but-unused blocks."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (10 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 30 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 18 << 30)
    assert engine.free_memory(torch.device("cuda", 0)) == 22 << 30
