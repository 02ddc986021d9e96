"""What a resume reuses is what the run was: --resume refuses changed flags (--allow-changes records
them in args.json), evaluate.py's resume fingerprint sees the weights, the data and the rendering, and
reading a resumable state runs no code from it (a pickle payload planted in every file the resume
opens never runs), while an honest state still restores bit-exactly."""
import argparse
import dataclasses
import io
import json
import os
import pickle
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_jsonl
from test_faults import Evil, inputs, run_main  # noqa: F401 (inputs: a fixture)

import checkpoint
import common
import errors
import evaluate
import files
import preflight
import records
import resume
import rl
import sft


# --- 1. --resume compares the flags with the run's args.json ------------------------------------------

def sft_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", str(out), "--batch-size", "4", "--micro-batch-size", "2",
            "--lr", "1e-3", "--max-steps", "4", "--seed", "3", *extra]


def rl_args(model, prompts, out, *extra):
    return ["--model", model, "--prompts", prompts, "--out", str(out), "--rollout-batch", "4",
            "--samples-per-prompt", "2", "--train-batch", "8", "--max-new-tokens", "4", "--lr", "3e-3",
            "--kl-coef", "0.01", "--rule", "format", "--max-steps", "2", "--dump-every", "0", *extra]


@pytest.fixture(scope="module")
def other_model(tiny_model, tmp_path_factory):
    """The same tiny model at another path: a different --model."""
    d = tmp_path_factory.mktemp("other") / "m"
    shutil.copytree(tiny_model, d)
    return str(d)


@pytest.fixture(scope="module")
def sft_run(tiny_model, inputs, tmp_path_factory):
    """An SFT run paused at step 2 of 4 (--stop-at 2): state/ and args.json in OUT."""
    out = tmp_path_factory.mktemp("sft_run") / "o"
    sft.main(sft_args(tiny_model, inputs["sft"], out, "--stop-at", "2"))
    checkpoint.release_out_dirs()
    return out


@pytest.fixture(scope="module")
def rl_run(tiny_model, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_run") / "o"
    rl.main(rl_args(tiny_model, inputs["rl"], out, "--stop-at", "1"))
    checkpoint.release_out_dirs()
    return out


@pytest.fixture
def no_model_loads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the flags were compared with args.json")
    monkeypatch.setattr(common, "build_policy", boom)


@pytest.mark.parametrize("stage,flag,value,was", [
    ("sft", "--lr", "0.0005", "0.001"),
    ("sft", "--model", "OTHER", "TINY"),
    ("sft", "--batch-size", "2", "4"),
    ("sft", "--max-steps", "5", "4"),
    ("rl", "--model", "OTHER", "TINY"),  # it would become the KL reference
    ("rl", "--lr", "0.001", "0.003"),
    ("rl", "--estimator", "grpo", "reinforce++"),
], ids=lambda x: str(x).lstrip("-"))
def test_resume_refuses_changed_flags(stage, flag, value, was, tiny_model, other_model, inputs, sft_run, rl_run,
                                      no_model_loads, monkeypatch, capsys):
    """A resume with a flag that changes the run: exit 2 before any model loads, the flag and both values
    named, args.json untouched."""
    value, was = (value.replace("OTHER", other_model), was.replace("TINY", tiny_model))
    module, out, argv = (sft, sft_run, sft_args(tiny_model, inputs["sft"], sft_run)) if stage == "sft" else \
        (rl, rl_run, rl_args(tiny_model, inputs["rl"], rl_run))
    before = (out / "args.json").read_bytes()
    code, _, err = run_main(monkeypatch, capsys, module, [*argv, flag, value, "--resume"])
    assert code == 2 and err.startswith("error: --resume: ") and "Traceback" not in err, err
    assert f"{flag} {value} (the run's: {was})" in err and "--allow-changes" in err, err
    assert len(err.strip().splitlines()) == 1
    assert (out / "args.json").read_bytes() == before


def test_resume_with_free_flags_and_allow_changes(tiny_model, inputs, sft_run, tmp_path, monkeypatch, capsys):
    """--stop-at / --save-every change freely; --allow-changes continues with a new --lr, which the
    resumed steps use (the restored optimizer and scheduler held the old one), and args.json keeps the
    run's flags plus each change with the step it took effect after; the next resume compares with the
    flags now in force."""
    out = tmp_path / "o"
    shutil.copytree(sft_run, out)
    first = json.loads((out / "args.json").read_text())
    argv = sft_args(tiny_model, inputs["sft"], out)
    code, _, err = run_main(monkeypatch, capsys, sft, [*argv, "--allow-changes"])
    assert code == 2 and "--allow-changes goes with --resume" in err
    code, _, err = run_main(monkeypatch, capsys, sft, [*argv, "--lr", "5e-4", "--stop-at", "3", "--save-every", "1",
                                                  "--resume", "--allow-changes"])
    assert code == 0, err
    rec = json.loads((out / "args.json").read_text())
    assert {k: v for k, v in rec.items() if k != "changes"} == first  # the run's own flags, never rewritten
    assert rec["changes"] == [{"after_step": 2, "flags": {"stop_at": [2, 3], "lr": [0.001, 0.0005],
                                                          "save_every": [0, 1]}}]
    lrs = [json.loads(x)["lr"] for x in open(out / "metrics.jsonl")]
    assert lrs[:2] == [1e-3, 1e-3] and lrs[2] == 5e-4 * common.cosine_lr(2, 4, 1)  # the new lr, on the schedule
    code, _, err = run_main(monkeypatch, capsys, sft, [*argv, "--resume"])  # --lr 1e-3: not the lr in force now
    assert code == 2 and "--lr 0.001 (the run's: 0.0005)" in err, err
    code, _, err = run_main(monkeypatch, capsys, sft, [*argv, "--lr", "5e-4", "--save-every", "1", "--resume"])
    assert code == 0, err
    rec = json.loads((out / "args.json").read_text())
    assert rec["changes"][1:] == [{"after_step": 3, "flags": {"stop_at": [3, None]}}]
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_frees_how_a_start_runs_and_reads_an_older_args_json(tiny_model, inputs, sft_run, tmp_path,
                                                                     monkeypatch, capsys):
    """--dist-timeout and a --device that resolves to the same device change no number: a resume may change
    them (the usual reason to resume is a job stopped by the collective timeout). A flag the run's args.json
    lacks (written before the flag existed) has its parser default there: a plain resume is no change, a
    value other than the default is one."""
    out = tmp_path / "o"
    shutil.copytree(sft_run, out)
    rec = json.loads((out / "args.json").read_text())
    older = {k: v for k, v in rec.items() if k not in ("device", "dist_timeout", "answer_only")}
    (out / "args.json").write_text(json.dumps(older))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(preflight, "nvidia_driver", lambda: None)  # a CPU machine: auto resolves to cpu
    argv = sft_args(tiny_model, inputs["sft"], out, "--resume")
    changes = lambda *extra: resume.resume_changes(sft.get_args([*argv, "--stop-at", "2", *extra]))  # noqa: E731
    assert changes() == {}
    assert changes("--dist-timeout", "120", "--device", "cpu") == {"dist_timeout": [60.0, 120.0],
                                                                   "device": ["auto", "cpu"]}
    with pytest.raises(errors.UsageError, match=r"--answer-only on \(the run's: off\)"):
        changes("--answer-only")
    with pytest.raises(errors.UsageError, match=r"--device cuda \(the run's: auto\)"):
        changes("--device", "cuda")  # no GPU here: another device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: auto resolves to cuda
    assert changes("--device", "cuda") == {"device": ["auto", "cuda"]}
    with pytest.raises(errors.UsageError, match=r"--device cpu \(the run's: auto\)"):
        changes("--device", "cpu")
    monkeypatch.undo()
    code, _, err = run_main(monkeypatch, capsys, sft, [*argv, "--dist-timeout", "120", "--device", "cpu"])
    assert code == 0, err
    assert json.loads((out / "args.json").read_text())["changes"] == [
        {"after_step": 2, "flags": {"stop_at": [2, None], "device": ["auto", "cpu"], "dist_timeout": [60.0, 120.0]}}]


# --- 3. reading a state runs no code ----------------------------------------------------------------------

def train_objects(model_dir):
    """The tiny policy, AdamW and the cosine schedule, as the stages build them (untrained)."""
    from transformers import AutoModelForCausalLM
    policy = common.Policy(AutoModelForCausalLM.from_pretrained(model_dir))
    flags = argparse.Namespace(optim="adamw", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, warmup_ratio=0.25)
    opt, sched = common.build_optimizer(policy.parameters(), flags, 4)  # warmup max(1, round(0.25 · 4)) = 1
    return policy, opt, sched


@pytest.fixture(scope="module")
def state(tiny_model, inputs, tmp_path_factory):
    """A resumable OUT written by save_state after one AdamW step (plus args.json and metrics.jsonl, which a
    resume also reads), and the trained objects."""
    out = tmp_path_factory.mktemp("state") / "o"
    out.mkdir()  # a stage's --out exists before its first save (claim_out_dir)
    policy, opt, sched = train_objects(tiny_model)
    torch.manual_seed(0)
    ids = torch.randint(0, policy.hf.config.vocab_size, (2, 9))
    policy.hf(ids).logits.float().logsumexp(-1).mean().backward()
    opt.step(), sched.step()
    checkpoint.save_state(out, policy, opt, sched, 1)
    files.write_json(out / "args.json", vars(sft.get_args(sft_args(tiny_model, inputs["sft"], out))))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.5}\n')
    return out, (policy, opt, sched)


def resume_from(out, model_dir, inputs):
    """What --resume reads, in order: args.json (resume_changes), then the state (load_state)."""
    resume.resume_changes(sft.get_args(sft_args(model_dir, inputs["sft"], out, "--resume")))
    objs = train_objects(model_dir)
    return checkpoint.load_state(out, *objs), objs


_OPENED = None  # while a list: every file path Python opens is appended (an audit hook, below)


def _audit(event, args):
    """Records each existing file opened for reading (open(), io.open, os.open)."""
    if event != "open" or _OPENED is None or not isinstance(args[0], (str, os.PathLike)):
        return
    path, mode, flags = args
    reading = not any(c in mode for c in "wax+") if isinstance(mode, str) else not flags & (os.O_WRONLY | os.O_RDWR)
    if reading and os.path.isfile(path):
        _OPENED.append(os.path.realpath(path))


sys.addaudithook(_audit)


def test_honest_state_restores_bit_exactly(state, tiny_model, inputs):
    """The safe readers change no value: model, optimizer (tensors and param_groups), scheduler and step
    come back equal to what was saved. Also records which files a resume opens (the planted test below
    covers each of them)."""
    global _OPENED
    out, (policy, opt, sched) = state
    _OPENED = []
    try:
        step, (p2, o2, s2) = resume_from(out, tiny_model, inputs)
    finally:
        opened, _OPENED = _OPENED, None
    assert step == 1
    for (k, a), (_, b) in zip(policy.state_dict().items(), p2.state_dict().items()):
        assert torch.equal(a, b), k
    sa, sb = opt.state_dict(), o2.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)
    assert sched.state_dict() == s2.state_dict()
    inside = sorted({os.path.relpath(p, out) for p in opened if p.startswith(os.path.realpath(out) + os.sep)})
    assert inside == sorted(PLANT_FILES), inside  # every file a resume opens has a payload test below


def plant_item(state_dir, want_tensor, payload):
    """Replace one storage item of the state's shard file (a tensor item or a non-tensor `bytes` item) by
    `payload`, moving the items after it, and rewrite .metadata to match (read here with pickle: the
    test's own honest file)."""
    md = pickle.load(open(state_dir / ".metadata", "rb"))
    items = sorted(md.storage_data.items(), key=lambda kv: kv[1].offset)
    assert {info.relative_path for _, info in items} == {"__0_0.distcp"}
    target = next(idx for idx, _ in items if (idx.index is not None) == want_tensor)
    old = (state_dir / "__0_0.distcp").read_bytes()
    new = b""
    for idx, info in items:
        chunk = payload if idx == target else old[info.offset:info.offset + info.length]
        md.storage_data[idx] = dataclasses.replace(info, offset=len(new), length=len(chunk))
        new += chunk
    (state_dir / "__0_0.distcp").write_bytes(new)
    pickle.dump(md, open(state_dir / ".metadata", "wb"))
    return target.fqn


def _payload(marker):
    buf = io.BytesIO()
    torch.save(Evil(marker), buf)
    return buf.getvalue()


def _plant_metadata(out, marker):
    md = pickle.load(open(out / "state" / ".metadata", "rb"))
    md.planner_data["evil"] = Evil(marker)  # anywhere in the pickle: unpickling it runs the call
    pickle.dump(md, open(out / "state" / ".metadata", "wb"))


def _plant_extra(out, marker):
    extra = torch.load(out / "state" / "extra_rank0.pt", weights_only=True)
    torch.save({**extra, "evil": Evil(marker)}, out / "state" / "extra_rank0.pt")


def _plant_json(name):
    def plant(out, marker):
        p = out / name
        p.write_bytes(pickle.dumps(Evil(marker), protocol=0) + p.read_bytes())  # protocol 0: ASCII text
    return plant


PLANT_FILES = {  # file a resume opens -> how a payload goes into it
    "state/.metadata": _plant_metadata,
    "state/__0_0.distcp": None,  # a bytes item and a tensor item, below
    "state/extra_rank0.pt": _plant_extra,
    "state/COMPLETE": _plant_json("state/COMPLETE"),
    "args.json": _plant_json("args.json"),
    "metrics.jsonl": _plant_json("metrics.jsonl"),
}
PLANTS = {"metadata": _plant_metadata,
          "bytes item": lambda out, m: plant_item(out / "state", False, _payload(m)),
          "tensor item": lambda out, m: plant_item(out / "state", True, _payload(m)),
          "extra_rank0.pt": _plant_extra, "COMPLETE": PLANT_FILES["state/COMPLETE"],
          "args.json": PLANT_FILES["args.json"], "metrics.jsonl": PLANT_FILES["metrics.jsonl"]}


@pytest.mark.parametrize("where", list(PLANTS))
def test_payload_in_any_state_file_never_runs(where, state, tiny_model, inputs, tmp_path):
    """A pickle whose load would create a marker file, planted in each file a resume opens: the resume
    is refused (UsageError: exit 2, one line naming the file) and the marker never appears. DCP itself
    unpickles .metadata and reads the bytes items with torch.load(weights_only=False): both ran the call."""
    out, marker = tmp_path / "o", tmp_path / "pwned"
    shutil.copytree(state[0], out)
    PLANTS[where](out, marker)
    with pytest.raises(errors.UsageError) as e:
        resume_from(out, tiny_model, inputs)
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and ("--resume" in msg or "metrics.jsonl" in msg), msg
    if where in ("metadata", "bytes item", "tensor item", "extra_rank0.pt"):
        assert f"{os.system.__module__}.system" in msg, msg  # the refused call is named


def test_payload_in_metadata_refused_by_the_cli(sft_run, tiny_model, inputs, tmp_path, monkeypatch, capsys):
    out, marker = tmp_path / "o", tmp_path / "pwned"
    shutil.copytree(sft_run, out)
    _plant_metadata(out, marker)
    code, _, err = run_main(monkeypatch, capsys, sft, [*sft_args(tiny_model, inputs["sft"], out), "--resume"])
    assert code == 2 and "state/.metadata: it names" in err and "not a checkpoint metadata class" in err, err
    assert "Traceback" not in err and not marker.exists()


# --- 2. evaluate.py's resume fingerprint -------------------------------------------------------------------

def eval_argv(model, data, out, *extra):
    return ["--model", model, "--benchmarks", "math500", "--data", f"math500={data}", "--samples", "1",
            "--max-new-tokens", "4", "--batch-size", "4", "--out", str(out), *extra]


def maths(path, golds):
    return write_jsonl(path, [{"problem": f"{i}*7?", "answer": g, "unique_id": f"p{i}"} for i, g in enumerate(golds)])


def test_evaluate_rerun_refuses_stale_records(tiny_model, tmp_path, monkeypatch, capsys):
    """Records made before a change are not reused: the model retrained at the same path, the data file
    corrected at the same path, other --chat-template-kwargs; each refused (exit 2, what changed named,
    the records untouched). A plain copy of the same files is reused without hashing twice, and
    --overwrite starts anew."""
    model, out = tmp_path / "model", tmp_path / "eval"
    shutil.copytree(tiny_model, model)
    data = maths(tmp_path / "m.jsonl", ["42", "42", "42"])
    argv = eval_argv(str(model), data, out)
    code, stdout, err = run_main(monkeypatch, capsys, evaluate, argv)
    assert code == 0 and "0 already in" in stdout, err
    recs = (out / "math500.jsonl").read_bytes()

    hashed = []
    real = resume.file_sha256
    monkeypatch.setattr(resume, "file_sha256", lambda p: hashed.append(os.path.basename(p)) or real(p))
    code, stdout, err = run_main(monkeypatch, capsys, evaluate, argv)
    assert code == 0 and "3 already in" in stdout and hashed == [], (err, hashed)  # the (size, mtime) cache
    shutil.copy(tiny_model + "/model.safetensors", model / "model.safetensors")  # the same bytes, a new mtime
    code, stdout, err = run_main(monkeypatch, capsys, evaluate, argv)
    assert code == 0 and "3 already in" in stdout and hashed == ["model.safetensors"], (err, hashed)

    def refused(argv, why):
        code, _, err = run_main(monkeypatch, capsys, evaluate, argv)
        assert code == 2 and "math500.jsonl holds records made with other settings" in err and why in err, err
        assert "--overwrite" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert (out / "math500.jsonl").read_bytes() == recs

    refused(argv + ["--chat-template-kwargs", '{"enable_thinking": false}'],
            'chat_template_kwargs null -> {"enable_thinking": false}')
    w = load_file(model / "model.safetensors")
    w["model.norm.weight"] += 0.5  # "retrained": same shapes, same file size, other weights
    save_file(w, model / "model.safetensors", metadata={"format": "pt"})
    refused(argv, f"the files of {model} changed")
    shutil.copy(tiny_model + "/model.safetensors", model / "model.safetensors")
    maths(tmp_path / "m.jsonl", ["42", "43", "42"])  # a corrected gold answer
    refused(argv, f"the rows of {data} changed")
    code, stdout, err = run_main(monkeypatch, capsys, evaluate, argv + ["--overwrite"])
    assert code == 0 and "0 already in" in stdout, err
    assert [json.loads(x)["gold"] for x in open(out / "math500.jsonl")] == ["42", "43", "42"]


# --- 4. one torn-line rule for every JSONL reader ---------------------------------------------------------

def test_every_jsonl_reader_drops_a_torn_last_line_and_names_a_bad_one_elsewhere(tmp_path, capsys):
    """A file the stages append to (metrics.jsonl, evaluate.py's NAME.jsonl) may end in a line a kill cut
    short: every reader drops it with a warning (files.read_jsonl with appended=True, evaluate.py's record
    resume, runs/report.py, runs/curves.py); a bad line anywhere else, or a torn line of an input table, is
    a DataError naming the file and the row."""
    from runs import curves, report
    rec = {"benchmark": "attaq", "id": "1", "sample": 0, "completion": "no", "step": 1}
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps(rec) + "\n" + '{"benchmark": "attaq", "id": "2", "samp')
    assert files.read_jsonl(torn, appended=True) == [rec]
    assert "dropped a torn last line (row 2)" in capsys.readouterr().out
    assert list(resume.read_records(torn, records.key)) == [("attaq", "1", 0)]
    assert report.read_jsonl(torn) == [rec] and curves.read_metrics(torn) == [rec]
    with pytest.raises(errors.DataError, match=r"torn.jsonl: row 2: invalid JSON"):
        files.read_jsonl(torn)  # an input table: a torn line is an error like any other
    middle = tmp_path / "middle.jsonl"
    middle.write_text('{"benchmark": "attaq", "id": "2", "samp\n' + json.dumps(rec) + "\n")
    for read in (lambda p: files.read_jsonl(p, appended=True), lambda p: resume.read_records(p, records.key),
                 report.read_jsonl):
        with pytest.raises(errors.DataError, match=r"middle.jsonl: row 1: invalid JSON"):
            read(middle)
    with pytest.raises(SystemExit, match=r"middle.jsonl: row 1: invalid JSON"):
        curves.read_metrics(middle)
