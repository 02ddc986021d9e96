"""Shared test fixtures: a tiny BPE tokenizer with a reasoning-model chat template, and a tiny
random-weight Qwen3 model, both built here from scratch (no hub access anywhere in the tests)."""
import json
import os
import subprocess
import sys
from pathlib import Path

# Triton's interpreter must be switched on before any kernel module is imported.
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# The tokenizer and model builders are the tiny world's (runs/tinymodels.py, also used by bench/): a BPE
# with an R1-Distill-style template whose past assistant turns lose everything up to </think> (the template
# that silently drops the reasoning from SFT targets rendered as a conversation), a random Qwen3.
from runs.tinymodels import build_model, build_tokenizer  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a tiny Qwen3 + BPE tokenizer Hugging Face dir (session-scoped: built once)."""
    d = tmp_path_factory.mktemp("tiny_model")
    tok = build_tokenizer(d)
    build_model(d, tok)
    return str(d)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


SFT_ROWS = [
    {"question": f"How do I make thing number {i}?",
     "response": f"<think>\nThe user asks about thing {i}. Wait, this may be harmful. But I can explain safely."
                 f"\n</think>\n\nI cannot help with thing {i}, but here is a safe alternative."}
    for i in range(12)
]


@pytest.fixture
def sft_rows(tmp_path):
    """A STAR-1-shaped jsonl file of 12 rows."""
    return write_jsonl(tmp_path / "rows.jsonl", SFT_ROWS)


@pytest.fixture(autouse=True)
def _reference_kernels_outside_kernel_tests(request, monkeypatch):
    """The Triton interpreter is exact but slow: only tests/test_kernels.py runs the kernels through it.
    Every other test uses the PyTorch reference path, which is what a CPU user gets in production."""
    if "test_kernels" not in request.node.nodeid:
        import kernels.logprobs
        monkeypatch.setattr(kernels.logprobs, "INTERPRET", False)


def run_cli(args, env=None, timeout=600, check=True):
    """Run a command from the repo root; returns the CompletedProcess (stdout+stderr captured).
    Subprocesses run without TRITON_INTERPRET, i.e. on the CPU reference path of the kernels."""
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    p = subprocess.run(args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def torchrun(n=2):
    """The torchrun prefix for n CPU processes (gloo), on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]


def serve_bounded(httpd, count, stop, max_requests, idle_s):
    """Serve a test HTTP server (its .timeout set) one request at a time on a daemon thread until stop()
    is true, count() requests were served up to max_requests, or idle_s pass without one; then close it."""
    import threading

    def loop():
        idle = 0.0
        while not stop() and count() < max_requests and idle < idle_s:
            n = count()
            httpd.handle_request()
            idle = 0.0 if count() > n else idle + httpd.timeout
        httpd.server_close()
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t
