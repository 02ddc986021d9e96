"""Fault injection on real CLI runs: SIGKILL at several points (one inside save_state, held
there by the test-only BEYOND_SFT_PAUSE_IN_SAVE hook) then --resume, compared with an uninterrupted
run; a NaN from a huge --lr; output-dir ownership (lock, --overwrite); a torn metrics line; rollout
dumps after a resume; checkpoints over training; an evaluation against a faulty 127.0.0.1 server that
resumes to the full set; every validated flag family refused with exit 2 before anything loads."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SFT_ROWS, serve_bounded, torchrun, write_jsonl
from test_reward import build_rm

import checkpoint
import cli
import common
import entropy
import evaluate
import reward
import rl
import sft

def timing(k):  # wall-clock metrics (dt, t_gen, gen tok/s, sampler_gap, ...): not compared
    return k == "dt" or k.startswith("t_") or "tok/s" in k or "gap" in k or "time" in k


# --- helpers --------------------------------------------------------------------------------------

def env():
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def start(args, log, extra_env=None):
    """A CLI run in the background, stdout+stderr to `log`."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**env(), **(extra_env or {})},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(p, cond, log, timeout=300):
    t0 = time.time()
    while not cond():
        if p.poll() is not None:
            raise AssertionError(f"run ended ({p.returncode}) before the kill point:\n{open(log).read()[-3000:]}")
        if time.time() - t0 > timeout:
            p.kill()
            raise AssertionError(f"kill point not reached in {timeout}s:\n{open(log).read()[-3000:]}")
        time.sleep(0.02)


def kill9(p):
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL


def descendants(pid):
    """Every process below `pid` (children, their children, ...), from /proc."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def run(args, log, extra_env=None):
    p = start(args, log, extra_env)
    p.wait(timeout=600)
    out = open(log).read()
    assert p.returncode == 0, out[-4000:]
    return out


def run_main(monkeypatch, capsys, module, argv):
    """A stage's CLI in-process (the exit-code path of `python STAGE.py ARGV`): (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        cli.cli_main(module.main, list(map(str, argv)))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        checkpoint.release_out_dirs()
    o = capsys.readouterr()
    return code, o.out, o.err


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def same_metrics(a, b):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if not timing(k)} == {k: v for k, v in y.items() if not timing(k)}


def weights(d):
    return load_file(os.path.join(d, "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def all_finite(d):
    return all(torch.isfinite(v).all() for v in weights(d).values())


# --- the runs the tests share -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault_data")
    return {"sft": write_jsonl(d / "rows.jsonl", SFT_ROWS),
            "rl": write_jsonl(d / "prompts.jsonl", [{"prompt": f"Tell me thing {i}."} for i in range(8)])}


def sft_args(model, data, out, *extra):
    return ["sft.py", "--model", model, "--data", data, "--out", str(out), "--batch-size", "4", "--epochs", "2",
            "--micro-batch-size", "2", "--lr", "1e-3", "--seed", "3", "--max-steps", "4", "--save-every", "1",
            "--keep-checkpoints", "2", *extra]


def rl_args(model, prompts, out, *extra):
    return ["rl.py", "--model", model, "--prompts", prompts, "--out", str(out), "--rollout-batch", "4",
            "--samples-per-prompt", "4", "--train-batch", "8", "--max-new-tokens", "6", "--seed", "1",
            "--lr", "3e-3", "--kl-coef", "0.01", "--rule", "format", "--max-steps", "4", "--save-every", "2",
            "--dump-every", "1", *extra]


@pytest.fixture(scope="module")
def sft_ref(tiny_model, inputs, tmp_path_factory):
    """The uninterrupted SFT run: 4 steps, state + export + checkpoints/step-N every step, newest 2 kept."""
    out = tmp_path_factory.mktemp("sft_ref") / "o"
    run(sft_args(tiny_model, inputs["sft"], out), out.parent / "log")
    return out


@pytest.fixture(scope="module")
def rl_ref(tiny_model, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_ref") / "o"
    run(rl_args(tiny_model, inputs["rl"], out), out.parent / "log")
    return out


# --- SFT: kills, resume, ownership, checkpoints -----------------------------------------------------

def test_checkpoints_over_training(sft_ref):
    """Failure 9: --save-every writes OUT/checkpoints/step-N (a from_pretrained dir), newest --keep-checkpoints kept."""
    from transformers import AutoModelForCausalLM
    ck = sft_ref / "checkpoints"
    assert sorted(os.listdir(ck)) == ["step-3", "step-4"]
    same_weights(ck / "step-4", sft_ref)  # the last one is the final export
    assert not torch.equal(weights(ck / "step-3")["model.norm.weight"], weights(sft_ref)["model.norm.weight"])
    m = AutoModelForCausalLM.from_pretrained(ck / "step-3")
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert json.load(open(sft_ref / "state" / "COMPLETE"))["step"] == 4


def test_kill_inside_save_then_resume_is_exact(tiny_model, inputs, sft_ref, tmp_path, monkeypatch, capsys):
    """Failures 2 and 3: SIGKILL between save_state's two renames (state.old + state.tmp, no state/);
    meanwhile a second run on the dir is refused at once; a run without --resume refuses the dir; --resume
    finds state.tmp and ends identical to the uninterrupted run."""
    out = tmp_path / "o"
    log = tmp_path / "log"
    p = start(sft_args(tiny_model, inputs["sft"], out), log, {"BEYOND_SFT_PAUSE_IN_SAVE": "2"})
    wait_for(p, lambda: "paused in save_state at step 2" in open(log).read(), log)
    # the run holds the dir: a second run stops at once, before any model loads
    t0 = time.time()
    code, _, err = run_main(monkeypatch, capsys, sft, sft_args(tiny_model, inputs["sft"], out, "--resume")[1:])
    assert code == 2 and "is in use by another run" in err and f"pid {p.pid}" in err and time.time() - t0 < 30
    kill9(p)
    assert (out / "state.old").is_dir() and (out / "state.tmp").is_dir() and not (out / "state").exists()
    assert json.load(open(out / "state.tmp" / "COMPLETE"))["step"] == 2
    # the owner is gone; a new run without --resume still refuses a dir holding a run
    code, _, err = run_main(monkeypatch, capsys, sft, sft_args(tiny_model, inputs["sft"], out)[1:])
    assert code == 2 and "holds a previous run" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "state.tmp").is_dir() and (out / "state.old").is_dir()  # untouched
    text = run(sft_args(tiny_model, inputs["sft"], out, "--resume"), tmp_path / "log2")
    assert "resumed from" in text and "at step 2" in text
    same_metrics(metrics(out), metrics(sft_ref))
    same_weights(out, sft_ref)
    assert sorted(os.listdir(out / "checkpoints")) == ["step-3", "step-4"]
    assert not (out / "state.old").exists() and not (out / "state.tmp").exists()


def test_kill_between_the_last_export_and_its_state_leaves_no_stale_export(tiny_model, inputs, sft_ref, tmp_path):
    """SIGKILL inside the LAST step's save_state: the export of that step is already in OUT (the export is
    written before the state), and --resume, which finds the complete state.tmp of the last step and has
    nothing left to train, ends with the uninterrupted run's weights. With the state written first, OUT
    kept step 3's export behind a finished step-4 state, and --resume never replaced it."""
    out = tmp_path / "o"
    log = tmp_path / "log"
    p = start(sft_args(tiny_model, inputs["sft"], out), log, {"BEYOND_SFT_PAUSE_IN_SAVE": "4"})
    wait_for(p, lambda: "paused in save_state at step 4" in open(log).read(), log)
    kill9(p)
    same_weights(out, sft_ref)  # the final export is there before the state is
    text = run(sft_args(tiny_model, inputs["sft"], out, "--resume"), tmp_path / "log2")
    assert "at step 4" in text, text[-2000:]
    same_weights(out, sft_ref)
    same_metrics(metrics(out), metrics(sft_ref))
    assert sorted(os.listdir(out / "checkpoints")) == ["step-3", "step-4"]
    assert json.load(open(out / "state" / "COMPLETE"))["step"] == 4


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks through /proc")
@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_two_ranks_killed_inside_save_then_resume_is_exact(stage, tiny_model, inputs, tmp_path):
    """A preempted 2-rank job: SIGKILL to every process of `torchrun --nproc_per_node 2 sft.py|rl.py` while
    rank 0 is held inside save_state at step 2 (rank 1 waits at the barrier), then the same command with
    --resume ends with the weights, metrics and checkpoints of an uninterrupted 2-rank run (rl: and with
    the same rollout dumps: the replayed steps sample what the killed run sampled)."""
    launcher = torchrun(2)[1:]  # after sys.executable, which start() adds
    args = (lambda o, *x: sft_args(tiny_model, inputs["sft"], o, *x)) if stage == "sft" else \
        (lambda o, *x: rl_args(tiny_model, inputs["rl"], o, *x))
    ref, out = tmp_path / "ref", tmp_path / "o"
    run([*launcher, *args(ref)], tmp_path / "log_ref")
    log = tmp_path / "log"
    p = start([*launcher, *args(out)], log, {"BEYOND_SFT_PAUSE_IN_SAVE": "2"})
    wait_for(p, lambda: "paused in save_state at step 2" in open(log).read(), log)
    # the launcher and both ranks at once (torchrun starts each rank in a session of its own, so killing the
    # launcher's process group alone leaves the ranks running, and holding the dir's lock)
    for pid in [p.pid, *descendants(p.pid)]:
        os.kill(pid, signal.SIGKILL)
    p.wait()
    assert (out / "state.tmp" / "COMPLETE").exists() and not (out / "state").exists()
    text = run([*launcher, *args(out, "--resume")], tmp_path / "log2")
    assert "resumed from" in text and "at step 2" in text
    same_metrics(metrics(out), metrics(ref))
    same_weights(out, ref)
    assert sorted(os.listdir(out / "checkpoints")) == (["step-3", "step-4"] if stage == "sft" else ["step-2", "step-4"])
    if stage == "rl":
        for s in range(1, 5):
            name = f"rollouts/step_{s:05d}.jsonl"
            assert open(out / name).read() == open(ref / name).read(), name


def test_kill_after_a_step_and_torn_metrics_line(tiny_model, inputs, sft_ref, tmp_path):
    """Failure 3: SIGKILL as soon as step 3 is logged (inside that step's save), a torn last line appended
    to metrics.jsonl (a kill mid-write): --resume drops it with a warning and ends identical."""
    out = tmp_path / "o"
    log = tmp_path / "log"
    p = start(sft_args(tiny_model, inputs["sft"], out), log)
    wait_for(p, lambda: (out / "metrics.jsonl").exists() and '"step": 3' in open(out / "metrics.jsonl").read(), log)
    kill9(p)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.12')  # torn: no closing brace, no newline
    text = run(sft_args(tiny_model, inputs["sft"], out, "--resume"), tmp_path / "log2")
    assert "dropped a torn last line" in text
    same_metrics(metrics(out), metrics(sft_ref))
    same_weights(out, sft_ref)


def test_overwrite_replaces_a_previous_run(tiny_model, inputs, sft_ref, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    shutil.copytree(sft_ref, out)
    code, _, err = run_main(monkeypatch, capsys, sft, sft_args(tiny_model, inputs["sft"], out, "--max-steps", "1")[1:])
    assert code == 2 and "holds a previous run" in err and len(metrics(out)) == 4
    code, _, err = run_main(monkeypatch, capsys, sft,
                       sft_args(tiny_model, inputs["sft"], out, "--max-steps", "1", "--overwrite")[1:])
    assert code == 0, err
    assert [m["step"] for m in metrics(out)] == [1] and os.listdir(out / "checkpoints") == ["step-1"]
    assert json.load(open(out / "state" / "COMPLETE"))["step"] == 1


class Evil:
    """Pickles to a call of os.system: what a state/ someone else wrote could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_pickled_code(tiny_model, inputs, sft_ref, tmp_path, monkeypatch, capsys):
    """Failure 4: the extra state is read with weights_only=True: a pickled call is refused, not run."""
    out, marker = tmp_path / "o", tmp_path / "pwned"
    shutil.copytree(sft_ref, out)
    extra = torch.load(out / "state" / "extra_rank0.pt", weights_only=True)
    torch.save({**extra, "evil": Evil(marker)}, out / "state" / "extra_rank0.pt")
    code, _, err = run_main(monkeypatch, capsys, sft, sft_args(tiny_model, inputs["sft"], out, "--resume")[1:])
    assert code == 2 and "extra_rank0.pt" in err and "weights_only" in err and "Traceback" not in err
    assert not marker.exists()


def test_huge_lr_stops_before_the_update_sft(tiny_model, inputs, tmp_path, monkeypatch, capsys):
    """Failure 1: --lr 1e30: the run stops (exit 1) naming the step before a non-finite update; the last
    saved state, export and checkpoint are complete and finite."""
    out = tmp_path / "o"
    code, stdout, err = run_main(monkeypatch, capsys, sft, sft_args(tiny_model, inputs["sft"], out, "--lr", "1e30")[1:])
    assert code == 1 and "non-finite" in err and "Traceback" not in err, err
    bad = int(err.split("error: step ")[1].split(":")[0])
    good = json.load(open(out / "state" / "COMPLETE"))["step"]
    assert bad >= 2 and good == bad - 1 and [m["step"] for m in metrics(out)] == list(range(1, bad))
    assert all_finite(out) and all_finite(out / "checkpoints" / f"step-{good}")
    assert not (out / "checkpoints" / f"step-{bad}").exists() and not (out / "state.tmp").exists()


# --- RL: kill + resume (rollout dumps), NaN ------------------------------------------------------------

def test_rl_kill_resume_no_duplicate_dumps_and_grade_takes_them(tiny_model, inputs, rl_ref, tmp_path,
                                                                  monkeypatch, capsys):
    """Failure 3 (rl): SIGKILL after step 3's rollout dump (state at step 2): after --resume the replayed
    step's dump holds 16 records, not 32, and weights and metrics equal the uninterrupted run.
    Failure 7: `evaluate.py grade` takes rl.py's rollout records."""
    out = tmp_path / "o"
    log = tmp_path / "log"
    p = start(rl_args(tiny_model, inputs["rl"], out), log)
    wait_for(p, lambda: (out / "rollouts" / "step_00003.jsonl").exists(), log)
    kill9(p)
    text = run(rl_args(tiny_model, inputs["rl"], out, "--resume"), tmp_path / "log2")
    assert "at step 2" in text
    for s in range(1, 5):
        assert len(open(out / "rollouts" / f"step_{s:05d}.jsonl").readlines()) == 16
    same_metrics(metrics(out), metrics(rl_ref))
    same_weights(out, rl_ref)
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2", "step-4"]
    graded = tmp_path / "graded.jsonl"
    code, _, err = run_main(monkeypatch, capsys, evaluate,
                       ["grade", "--input", out / "rollouts" / "step_00003.jsonl", "--out", graded])
    assert code == 0, err
    recs = [json.loads(x) for x in open(graded)]
    want = [json.loads(x) for x in open(out / "rollouts" / "step_00003.jsonl")]
    assert len(recs) == 16 and [r["score"] for r in recs] == [r["score"] for r in want]


def test_huge_lr_stops_before_the_update_rl(tiny_model, inputs, tmp_path, monkeypatch, capsys):
    """Failure 1 (rl): --lr 1e30 stops before the update instead of exiting 0 with an all-NaN model (the
    entropy bonus makes the first gradient non-zero even when every reward is 0)."""
    out = tmp_path / "o"
    code, _, err = run_main(monkeypatch, capsys, rl,
                       rl_args(tiny_model, inputs["rl"], out, "--lr", "1e30", "--save-every", "1", "--entropy-coef", "0.1",
                               "--dump-every", "0")[1:])
    assert code == 1 and "non-finite" in err and "Traceback" not in err, err
    bad = int(err.split("error: step ")[1].split(":")[0])
    good = json.load(open(out / "state" / "COMPLETE"))["step"]
    assert bad >= 2 and good == bad - 1 and [m["step"] for m in metrics(out)] == list(range(1, bad))
    assert all_finite(out) and all_finite(out / "checkpoints" / f"step-{good}")


# --- evaluation against a faulty server ---------------------------------------------------------------

class FaultyServer:
    """OpenAI-compatible /v1/completions on 127.0.0.1. While `faulty`, the job with seed 1 gets HTTP 400,
    seed 3 a non-JSON body, seed 5 a reply slower than the client's timeout; the others (and everything
    once faulty is off) a completion naming its seed. Serves at most `max_requests` requests, and stops
    when closed or after 60 s without one."""

    def __init__(self, max_requests=100):
        self.faulty, self.requests, self.stop_ids, self.closed = True, [], [], False
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, code, data):
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seed = body["seed"]
                outer.requests.append(seed)
                outer.stop_ids.append(body["stop_token_ids"])
                try:
                    if outer.faulty and seed == 1:
                        return self.reply(400, b'{"error": "bad request"}')
                    if outer.faulty and seed == 3:
                        return self.reply(200, b"<html>502 Bad Gateway</html>")
                    if outer.faulty and seed == 5:
                        time.sleep(1.5)  # the client gave up after --api-timeout 0.5
                    text = f"seed {seed}\n</think>\n\nThe answer is \\boxed{{42}}."
                    self.reply(200, json.dumps({"choices": [{"text": text, "finish_reason": "stop"}],
                                                "usage": {"completion_tokens": 7}}).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.timeout = 1.0
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

        self.thread = serve_bounded(self.httpd, lambda: len(self.requests), lambda: self.closed, max_requests, 60)

    def close(self):
        self.closed = True
        self.thread.join(10)


@pytest.fixture
def faulty_server():
    s = FaultyServer()
    yield s
    s.close()


def eval_cmd(model, data, out, *extra):
    return ["--model", model, "--benchmarks", "math500", "--data", f"math500={data}", "--samples", "math500=2",
            "--api-model", "tiny", "--api-workers", "2", "--api-timeout", "0.5", "--api-retries", "1",
            "--max-new-tokens", "8", "--out", out, *extra]


def test_evaluation_keeps_every_record_and_resumes(tiny_model, tmp_path, faulty_server, monkeypatch, capsys):
    """Failure 5: a 400, a non-JSON reply and a timeout among 8 API jobs: the 5 good records are kept,
    the 3 failed ones become `error` records (counted in the summary, not scored); rerunning the same
    command sends only the 3 failed jobs and ends with the full set. More failures than --max-failures
    stop the run (exit 1) with what finished on disk."""
    data = write_jsonl(tmp_path / "m.jsonl", [{"problem": f"{i}*7?", "answer": "42", "unique_id": f"p{i}"}
                                              for i in range(4)])
    out = tmp_path / "eval"
    cmd = eval_cmd(tiny_model, data, out, "--api-url", faulty_server.url, "--max-failures", "3")
    code, _, err = run_main(monkeypatch, capsys, evaluate, cmd)
    assert code == 0, err
    recs = [json.loads(x) for x in open(out / "math500.jsonl")]
    assert len(recs) == 8
    failed = sorted(2 * int(r["id"][1:]) + r["sample"] for r in recs if r.get("error"))
    assert failed == [1, 3, 5], recs
    by_i = {2 * int(r["id"][1:]) + r["sample"]: r for r in recs}
    assert "HTTP 400" in by_i[1]["error"] and "malformed reply" in by_i[3]["error"] and "timed out" in by_i[5]["error"]
    assert all(by_i[i]["completion"].startswith(f"seed {i}\n") and by_i[i]["score"] == 1.0 for i in (0, 2, 4, 6, 7))
    s = json.load(open(out / "summary.json"))["benchmarks"]["math500"]
    assert s["n_errors"] == 3 and s["n_records"] == 5 and s["score"] == 1.0
    assert sorted(faulty_server.requests) == [0, 1, 2, 3, 3, 4, 5, 5, 6, 7]  # retries: non-JSON and timeout
    assert all(isinstance(x, list) and x for x in faulty_server.stop_ids)  # the template's stop ids in every request

    faulty_server.faulty, faulty_server.requests = False, []
    code, stdout, err = run_main(monkeypatch, capsys, evaluate, cmd)
    assert code == 0, err
    assert sorted(faulty_server.requests) == [1, 3, 5] and "5 already in" in stdout
    recs = [json.loads(x) for x in open(out / "math500.jsonl")]
    assert [2 * int(r["id"][1:]) + r["sample"] for r in recs] == list(range(8))
    assert not any(r.get("error") for r in recs) and all(r["score"] == 1.0 for r in recs)
    s = json.load(open(out / "summary.json"))["benchmarks"]["math500"]
    assert s["n_errors"] == 0 and s["n_records"] == 8

    faulty_server.faulty = True
    out2 = tmp_path / "eval2"
    code, _, err = run_main(monkeypatch, capsys, evaluate,
                       eval_cmd(tiny_model, data, out2, "--api-url", faulty_server.url, "--max-failures", "0"))
    assert code == 1 and "more than --max-failures 0" in err and "rerun the same command" in err
    recs = [json.loads(x) for x in open(out2 / "math500.jsonl")]
    assert any(r.get("error") and "HTTP 400" in r["error"] for r in recs)
    assert all(r["completion"].startswith("seed ") for r in recs if not r.get("error"))
    assert all(isinstance(x, list) and x for x in faulty_server.stop_ids)


# --- every validated flag family: exit 2, the flag named, no traceback, nothing loaded or written -------

@pytest.fixture
def no_loads(monkeypatch):
    """Any model or tokenizer load fails the test."""
    def boom(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the flags were checked")
    for mod, name in [(common, "load_tokenizer"), (common, "load_model"), (common, "build_policy"),
                      (reward, "RewardModel")]:
        monkeypatch.setattr(mod, name, boom)


BAD_FLAGS = [  # (stage, bad flags, what stderr must name)
    ("sft", ["--epochs", "0"], "--epochs"),
    ("sft", ["--micro-batch-size", "0"], "--micro-batch-size"),
    ("sft", ["--lr", "-1"], "--lr"),
    ("sft", ["--save-every", "-1"], "--save-every"),
    ("sft", ["--batch-size", "0"], "--batch-size"),
    ("sft", ["--resume", "--overwrite"], "--overwrite"),
    ("sft", ["--stop-at", "0"], "--stop-at"),
    ("rl", ["--temperature", "-1"], "--temperature"),
    ("rl", ["--temperature", "0"], "--temperature"),
    ("rl", ["--top-p", "1.5"], "--top-p"),
    ("rl", ["--gen-batch-size", "0"], "--gen-batch-size"),
    ("rl", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("rl", ["--micro-batch-size", "0"], "--micro-batch-size"),
    ("rl", ["--rm-batch-size", "0"], "--rm-batch-size"),
    ("rl", ["--save-every", "0"], "--save-every"),
    ("rl", ["--max-prompt-len", "0"], "--max-prompt-len"),
    ("rl", ["--train-batch", "5"], "--train-batch"),
    ("rl", ["--lr", "nan"], "--lr"),
    ("evaluate", ["--temperature", "-1"], "--temperature"),
    ("evaluate", ["--top-p", "0"], "--top-p"),
    ("evaluate", ["--limit", "-1"], "--limit"),
    ("evaluate", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("evaluate", ["--batch-size", "0"], "--batch-size"),
    ("evaluate", ["--rm-batch-size", "0"], "--rm-batch-size"),
    ("evaluate", ["--api-timeout", "0"], "--api-timeout"),
    ("evaluate", ["--api-retries", "-1"], "--api-retries"),
    ("evaluate", ["--max-failures", "-1"], "--max-failures"),
    ("grade", ["--out", "{tmp}/missing/graded.jsonl"], "--out"),
    ("reward", ["--rm-batch-size", "0"], "--rm-batch-size"),
    ("reward", ["--out", "{tmp}/missing/scored.jsonl"], "--out"),
]


def stage_cmd(stage, model, inputs, tmp, extra):
    extra = [x.replace("{tmp}", str(tmp)) for x in extra]
    recs = write_jsonl(tmp / "recs.jsonl", [{"prompt": "p", "completion": "c", "benchmark": "rl", "id": "0",
                                             "sample": 0}])
    if stage == "sft":
        return sft, ["--model", model, "--data", inputs["sft"], "--out", tmp / "o", *extra]
    if stage == "rl":
        return rl, ["--model", model, "--prompts", inputs["rl"], "--out", tmp / "o", "--rule", "format", *extra]
    if stage == "evaluate":
        return evaluate, ["--model", model, "--benchmarks", "math500", "--data", f"math500={inputs['rl']}",
                          "--out", tmp / "o", *extra]
    if stage == "grade":
        return evaluate, ["grade", "--input", recs, *extra]
    return reward, ["--input", recs, "--out", tmp / "o" / "scored.jsonl", "--rule", "format", *extra]  # last --out wins


@pytest.mark.parametrize("stage,bad,flag", BAD_FLAGS, ids=[f"{s}{''.join(b)}" for s, b, _ in BAD_FLAGS])
def test_bad_flag_refused_before_anything_loads(stage, bad, flag, tiny_model, inputs, tmp_path, no_loads,
                                                monkeypatch, capsys):
    """Failure 6 (and 7's --out checks): exit 2, the flag named, no traceback, nothing loaded, nothing written."""
    module, argv = stage_cmd(stage, tiny_model, inputs, tmp_path, bad)
    code, _, err = run_main(monkeypatch, capsys, module, argv)
    assert code == 2 and flag in err and err.startswith("error: ") and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("module,argv", [(sft, []), (rl, []), (entropy, []), (evaluate, []), (evaluate, ["grade"]),
                                         (reward, [])], ids=["sft", "rl", "entropy", "evaluate", "grade", "reward"])
def test_every_help_shows_every_default(module, argv, monkeypatch, capsys):
    """Each flag with a value shows "(default: X)" in --help, unless its own help states the default."""
    import argparse
    parsers, real = [], argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, *a, **k: parsers.append(self) or real(self, *a, **k))
    with pytest.raises(SystemExit) as e:
        (getattr(module, "get_args", None) or module.main)([*argv, "--help"])
    text = "".join(capsys.readouterr().out.split())  # without whitespace: help lines wrap, also at hyphens
    assert e.value.code == 0 and "(default:" in text
    for act in parsers[-1]._actions:
        if act.option_strings and act.default not in (None, False, argparse.SUPPRESS):
            states = "(default" in (act.help or "") or "by default" in (act.help or "")
            assert states or f"(default:{act.default})".replace(" ", "") in text, act.option_strings


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_wandb_missing_fails_at_start(stage, tiny_model, inputs, tmp_path, no_loads, monkeypatch, capsys):
    """Failure 8: --wandb without wandb: exit 2 with an install hint before any model loads."""
    module, argv = stage_cmd(stage, tiny_model, inputs, tmp_path, ["--wandb", "proj"])
    code, _, err = run_main(monkeypatch, capsys, module, argv)
    assert code == 2 and "--wandb" in err and "pip install wandb" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_reward_empty_input_and_nan_score(tmp_path, monkeypatch, capsys):
    """Failure 7: reward.py on an empty input, and an RM that returns NaN: exit 2, nothing written."""
    from transformers import AutoModelForSequenceClassification
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run_main(monkeypatch, capsys, reward, ["--input", empty, "--out", tmp_path / "a.jsonl", "--rule", "format"])
    assert code == 2 and "no records" in err and not (tmp_path / "a.jsonl").exists()
    rm_dir = build_rm(tmp_path / "nan_rm")
    m = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    with torch.no_grad():
        m.score.weight.fill_(float("nan"))
    m.save_pretrained(rm_dir)
    recs = write_jsonl(tmp_path / "recs.jsonl", [{"prompt": "p", "completion": "c"}])
    code, _, err = run_main(monkeypatch, capsys, reward, ["--input", recs, "--out", tmp_path / "b.jsonl",
                                                     "--reward-model", rm_dir])
    assert code == 2 and "row 1" in err and "non-finite" in err and not (tmp_path / "b.jsonl").exists()
