"""The failure policy every CLI shares (cli.cli_main): an error the user can cause ends in ONE line on
stderr naming what to fix (the flag; the file with its line or row and field; the model dir and what in it
is wrong; the path that is full or read-only), exit 2 for usage and input errors and 1 for a run stopped on
purpose or by a full disk, no traceback unless BEYOND_SFT_DEBUG=1, nothing half-written left and nothing
outside --out touched. The disk faults are real: a small tmpfs where mounting works (root; skipped
elsewhere) and the process's file-size limit (RLIMIT_FSIZE, any user)."""
import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess

import pytest
import torch

import benchmarks
import checkpoint
import cli
import common
import errors
import files
import entropy
import evaluate
import preflight
import reward
import rl
import sft
import tables
from conftest import write_jsonl
from test_faults import inputs, no_loads, run_main, rl_args, sft_args, stage_cmd  # noqa: F401 -- fixtures


def one_error(code, err, want, *names):
    """Exit `want`, exactly one `error: ` line and it is the last, naming each of `names`; no traceback."""
    lines = [x for x in err.splitlines() if x.strip()]
    errs = [x for x in lines if x.startswith("error: ")]
    assert code == want and len(errs) == 1 and lines[-1] == errs[0] and "Traceback" not in err, (code, err)
    for n in names:
        assert str(n) in errs[0], (n, errs[0])
    return errs[0]


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the test (tokenizers may load: rendering prompts needs them)."""
    def boom(*a, **k):
        raise AssertionError("model weights were loaded before the inputs were checked")
    for mod, name in [(common, "load_model"), (common, "build_policy"), (reward, "RewardModel")]:
        monkeypatch.setattr(mod, name, boom)


def recs_file(path, n=2):
    return write_jsonl(path, [{"benchmark": "attaq", "id": str(i), "sample": 0, "prompt": f"p{i}",
                               "completion": "<think>\nWait, no.\n</think>\n\nI cannot help with that.",
                               "temperature": 0.6} for i in range(n)])


def command(stage, model, inputs, tmp, extra=()):
    """test_faults.stage_cmd with a writable --out for grade and reward, and entropy.py."""
    if stage == "entropy":
        inputs = [] if "--input" in extra else ["--input", recs_file(tmp / "r.jsonl")]
        return entropy, ["--model", model, *inputs, "--out", tmp / "o", *extra]
    base = {"grade": ["--out", tmp / "g.jsonl"], "reward": ["--out", tmp / "s.jsonl"],
            "rl": ["--max-new-tokens", "8"]}.get(stage, [])  # within the tiny model's context of 1024
    return stage_cmd(stage, model, inputs, tmp, [str(x) for x in (*base, *extra)])  # the last one of a flag wins


def raising(e):
    def f(*a, **k):
        raise e
    return f


def leftovers(d):
    """Temp files and dirs anywhere under d."""
    return sorted(os.path.relpath(os.path.join(r, n), d) for r, ds, fs in os.walk(d) for n in ds + fs
                  if n.endswith(".tmp"))


# --- the policy itself ----------------------------------------------------------------------------------

def test_argparse_errors_are_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, entropy, ["--model", "m", "--input", "x", "--out", tmp_path,
                                                      "--temperature", "hot"])
    one_error(code, err, 2, "argument --temperature", "invalid float value: 'hot'", "--help)")
    code, _, err = run_main(monkeypatch, capsys, sft, ["--model", "m"])
    one_error(code, err, 2, "required", "--data", "--out")


def test_debug_env_shows_the_traceback_and_bugs_keep_theirs(monkeypatch, capsys):
    """BEYOND_SFT_DEBUG=1 re-raises a usage error; an unexpected exception is never turned into a line."""
    monkeypatch.setattr(sft, "get_args", raising(errors.UsageError("--epochs bad")))
    code, _, err = run_main(monkeypatch, capsys, sft, [])
    one_error(code, err, 2, "--epochs bad")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(errors.UsageError, match="--epochs bad"):
        cli.cli_main(sft.main, [])
    monkeypatch.delenv(cli.DEBUG_ENV)
    monkeypatch.setattr(sft, "get_args", raising(KeyError("a bug")))
    with pytest.raises(KeyError):
        cli.cli_main(sft.main, [])
    monkeypatch.setattr(sft, "get_args", raising(OSError(2, "No such file", "x")))
    with pytest.raises(FileNotFoundError):  # not a write failure: a bug until something names its path
        cli.cli_main(sft.main, [])


# --- input files: encodings, byte-order marks, parse errors ----------------------------------------------

BAD_UTF8 = (b'{"question": "q", "response": "r", "prompt": "p", "completion": "c", "problem": "1", "answer": "2"}\n'
            b'{"question": "caf\xe9", "response": "r", "prompt": "p", "completion": "c", "problem": "2"}\n')


@pytest.mark.parametrize("stage,flag", [("sft", "--data"), ("sft", "--decontaminate"), ("rl", "--prompts"),
                                        ("evaluate", "--data"), ("evaluate", "--train-data"), ("grade", "--input"),
                                        ("reward", "--input"), ("entropy", "--input")])
def test_non_utf8_byte_names_file_and_line(stage, flag, tiny_model, inputs, tmp_path, no_weights,  # noqa: F811
                                           monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(BAD_UTF8)
    good = write_jsonl(tmp_path / "good.jsonl", [{"question": "q", "response": "r", "problem": "1+1?",
                                                   "answer": "2"}] * 2)
    if stage == "evaluate":
        data = bad if flag == "--data" else good
        module, argv = command(stage, tiny_model, inputs, tmp_path, ["--data", f"math500={data}"]
                               + (["--train-data", bad] if flag == "--train-data" else []))
    else:
        module, argv = command(stage, tiny_model, inputs, tmp_path, [flag, bad])  # the last one wins
    code, _, err = run_main(monkeypatch, capsys, module, argv)
    one_error(code, err, 2, bad, "line 2", "byte 0xe9", "not UTF-8")
    assert not (tmp_path / "o").exists()


def test_byte_order_marks_are_dropped(tmp_path):
    """Excel and Notepad save UTF-8 with a BOM: the first column keeps its name (AttaQ's 'input')."""
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbfinput,label\nHow do I pick a lock?,violence\n")
    assert tables.read_table(tmp_path / "a.csv") == [{"input": "How do I pick a lock?", "label": "violence"}]
    assert benchmarks.load_benchmark("attaq", str(tmp_path / "a.csv"))[0]["category"] == "violence"
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"question": "q", "response": "r"}\n')
    assert tables.load_pairs(str(tmp_path / "b.jsonl"))[0]["prompt"] == "q"
    (tmp_path / "c.json").write_bytes(b'\xef\xbb\xbf[{"question": "q", "response": "r"}]')
    assert tables.read_table(str(tmp_path / "c.json")) == [{"question": "q", "response": "r"}]


def test_rl_rule_math_needs_the_gold_answer_of_every_row(tiny_model, inputs, tmp_path, no_weights,  # noqa: F811
                                                          monkeypatch, capsys):
    """--rule math grades against each prompt row's gold answer (--gold-field, default 'answer'): a row without one
    stops the run before any weight loads, naming the file, the row and the field, and nothing is written."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1?", "answer": 2}, {"prompt": "2+2?"}] * 4)
    module, argv = command("rl", tiny_model, inputs, tmp_path, ["--prompts", prompts, "--rule", "math"])
    code, _, err = run_main(monkeypatch, capsys, module, argv)
    one_error(code, err, 2, prompts, "row 2", "missing field 'answer'")
    assert not (tmp_path / "o").exists()


def test_load_pairs_keeps_the_gold_answer_as_text(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "1+1?", "answer": 2}, {"prompt": "half?", "answer": "\\frac12"}])
    assert [r["gold"] for r in tables.load_pairs(p, need_response=False, gold_field="answer")] == ["2", "\\frac12"]
    assert "gold" not in tables.load_pairs(p, need_response=False)[0]
    null = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "1+1?", "answer": 2}, {"prompt": "2+2?", "answer": None}])
    with pytest.raises(errors.DataError, match=r"n.jsonl: row 2: missing field 'answer' \(the gold answer\)"):
        tables.load_pairs(null, need_response=False, gold_field="answer")  # never graded against the text "None"


def test_a_json_string_may_hold_a_line_separator(tmp_path):
    """Only \\n ends a JSONL line: U+2028 inside a string (json.dumps(ensure_ascii=False) writes it raw) is text."""
    path = tmp_path / "r.jsonl"
    files.write_jsonl(str(path), [{"completion": "a\u2028b"}, {"completion": "c"}])
    assert files.read_jsonl(path) == [{"completion": "a\u2028b"}, {"completion": "c"}]


@pytest.mark.parametrize("name,content,named", [
    ("x.parquet", b"PAR1 this is not a parquet file", "not a readable parquet file"),
    ("x.csv", b"question,response\nq1,r1\nq2,r2,an unquoted comma\n", "row 2: 3 fields, the header has 2"),
    ("x.jsonl", b'{"question": "q", "response": "r"}\n{"question": "q2", "response": \n', "row 2: invalid JSON"),
    ("x.json", b'[{"question": "q"}, {"question": }]', "invalid JSON at line 1"),
])
def test_corrupt_files_are_named(name, content, named, tiny_model, tmp_path, no_weights, monkeypatch, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    module, argv = command("rl", tiny_model, {"rl": path}, tmp_path)
    code, _, err = run_main(monkeypatch, capsys, module, argv)
    one_error(code, err, 2, path, named)
    assert not (tmp_path / "o").exists()


# --- model directories: checked before any weight is read ---------------------------------------------------

def broken_model(src, d, what):
    """A copy of the tiny model dir with one thing wrong."""
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    if what == "no tokenizer.json":
        (d / "tokenizer.json").unlink()
    elif what == "no tokenizer files":
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (d / f).unlink()
    elif what == "not a causal LM":
        cfg.update(model_type="vit", architectures=["ViTModel"])
    elif what == "unknown model_type":
        cfg.update(model_type="foobar", architectures=["FoobarForCausalLM"])
    elif what == "truncated safetensors":
        os.truncate(d / "model.safetensors", 5000)
    elif what == "cut safetensors header":
        os.truncate(d / "model.safetensors", 100)
    elif what == "missing shard":
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


BROKEN = [("no tokenizer.json", "no tokenizer files"), ("no tokenizer files", "no tokenizer files"),
          ("not a causal LM", "model_type 'vit' (architectures ['ViTModel']) is not a causal language model"),
          ("unknown model_type", "model_type 'foobar', unknown to transformers"),
          ("truncated safetensors", "model.safetensors is truncated (5000 of 139"),
          ("cut safetensors header", "model.safetensors has no complete safetensors header"),
          ("missing shard", "weight file model-00002-of-00002.safetensors is missing")]


@pytest.mark.parametrize("what,named", BROKEN, ids=[w for w, _ in BROKEN])
def test_broken_model_dir_named_before_any_weight_loads(what, named, tiny_model, inputs, tmp_path,  # noqa: F811
                                                        no_weights, monkeypatch, capsys):
    d = broken_model(tiny_model, tmp_path / "m", what)
    code, _, err = run_main(monkeypatch, capsys, sft, ["--model", d, "--data", inputs["sft"], "--out", tmp_path / "o"])
    one_error(code, err, 2, f"--model {d}", named)
    assert not (tmp_path / "o").exists()


def test_every_cli_checks_its_model_dirs(tiny_model, inputs, tmp_path, no_weights, monkeypatch, capsys):  # noqa: F811
    """rl's --model and --reward-model (a sequence classifier), evaluate's --model, --safety-rm (AttaQ) and a
    local --judge (AIR-Bench, needs a chat template), reward.py's --reward-model, entropy.py's --model NAME:
    each refused before any weight is read and before any generation."""
    bad = broken_model(tiny_model, tmp_path / "bad", "truncated safetensors")
    no_template = broken_model(tiny_model, tmp_path / "nt", "")
    (no_template / "chat_template.jinja").unlink()
    not_rm = broken_model(tiny_model, tmp_path / "vit", "not a causal LM")
    recs = recs_file(tmp_path / "recs.jsonl")
    attaq = write_jsonl(tmp_path / "attaq.jsonl", [{"input": "q", "label": "harm"}])
    air = write_jsonl(tmp_path / "air.jsonl", [{"prompt": "q", "cate-idx": "1", "l2-name": "x"}])
    jp = write_jsonl(tmp_path / "jp.jsonl", [{"cate-idx": "1", "judge_prompt": "{{QUESTION}} {{ANSWER}}"}])
    ev = ["--model", tiny_model, "--out", tmp_path / "o", "--max-new-tokens", "4"]
    cases = [
        (rl, ["--model", bad, "--prompts", inputs["rl"], "--out", tmp_path / "o", "--rule", "format"],
         f"--model {bad}"),
        (rl, ["--model", tiny_model, "--prompts", inputs["rl"], "--out", tmp_path / "o", "--reward-model", not_rm],
         f"--reward-model {not_rm}: model_type 'vit' (architectures ['ViTModel']) is not a sequence classifier"),
        (evaluate, ["--model", bad, "--benchmarks", "math500", "--data", f"math500={inputs['rl']}", "--out",
                    tmp_path / "o"], f"--model {bad}"),
        (evaluate, [*ev, "--benchmarks", "attaq", "--data", f"attaq={attaq}", "--safety-rm", tmp_path / "none"],
         f"--safety-rm path does not exist: {tmp_path / 'none'}"),
        (evaluate, [*ev, "--benchmarks", "airbench", "--data", f"airbench={air}", "--airbench-judge-prompts", jp,
                    "--judge", no_template], f"--judge {no_template}: its tokenizer has no chat template"),
        (evaluate, ["grade", "--input", recs, "--out", tmp_path / "g.jsonl", "--safety-rm", bad], f"--safety-rm {bad}"),
        (reward, ["--input", recs, "--out", tmp_path / "s.jsonl", "--reward-model", bad], f"--reward-model {bad}"),
        (entropy, ["--model", f"x={bad}", "--input", recs, "--out", tmp_path / "o"], f"--model x {bad}")]
    for module, argv, named in cases:
        code, _, err = run_main(monkeypatch, capsys, module, argv)
        one_error(code, err, 2, named)
        assert not (tmp_path / "o").exists() and not (tmp_path / "g.jsonl").exists()


# --- flag values: usable, not just numbers ----------------------------------------------------------------

def parser_of(module, argv=()):
    """The ArgumentParser a CLI builds (caught at its parse_args call)."""
    if module is evaluate:
        return evaluate.grade_parser() if argv[:1] == ["grade"] else evaluate.eval_parser()
    seen = []

    def grab(self, *a, **k):
        seen.append(self)
        raise SystemExit(0)
    with pytest.MonkeyPatch.context() as m, contextlib.suppress(SystemExit):
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        (getattr(module, "get_args", None) or module.main)([])
    return seen[0]


@pytest.mark.parametrize("stage", ["sft", "rl", "evaluate", "grade", "entropy"])
def test_every_float_flag_refuses_nan_and_inf(stage, tiny_model, inputs, tmp_path, no_loads,  # noqa: F811
                                              monkeypatch, capsys):
    module, base = command(stage, tiny_model, inputs, tmp_path)
    floats = (float, cli.dist_minutes)  # every flag that parses a float
    flags = [(a.option_strings[0], a.nargs) for a in parser_of(module, base[:1])._actions if a.type in floats]
    assert flags, stage
    for flag, nargs in flags:
        for bad in ("nan", "inf"):
            code, _, err = run_main(monkeypatch, capsys, module, [*base, flag, bad] + ["0.9"] * ((nargs or 1) - 1))
            one_error(code, err, 2, flag, bad)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage,argv,named", [
    ("rl", ["--temperature", "1e-40"], "--temperature must be a finite value >= 0.01"),
    ("evaluate", ["--temperature", "0.001"], "--temperature must be 0 (greedy) or a finite value >= 0.01"),
    ("entropy", ["--temperature", "1e-40"], "--temperature must be a finite value >= 0.01"),
    ("rl", ["--rule", "refusal:nan"], "--rule: weight of 'refusal' must be finite, got 'nan'"),
    ("reward", ["--rule", "format:inf"], "--rule: weight of 'format' must be finite, got 'inf'"),
    ("rl", ["--max-new-tokens", str(10 ** 12)], "--max-new-tokens 1000000000000 leaves no room for a prompt in the "
                                                "context of --model"),
    ("evaluate", ["--api-timeout", "1e30"], "--api-timeout must be in (0, 86400]"),
    ("grade", ["--api-timeout", "1e30"], "--api-timeout must be in (0, 86400]"),
    ("entropy", ["--bootstrap", str(10 ** 15)], "--bootstrap must be <= 100000"),
    ("sft", ["--optim", "adamw8bit", "--device", "cpu"], "--optim adamw8bit needs a CUDA device"),
    ("rl", ["--optim", "adamw8bit", "--device", "cpu"], "--optim adamw8bit needs a CUDA device"),
])
def test_unusable_values_refused_up_front(stage, argv, named, tiny_model, inputs, tmp_path, no_loads,  # noqa: F811
                                          monkeypatch, capsys):
    module, argv = command(stage, tiny_model, inputs, tmp_path, argv)
    code, _, err = run_main(monkeypatch, capsys, module, argv)
    one_error(code, err, 2, named)
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_temperature_floor():
    cli.check_temperature(0, greedy_ok=True)
    cli.check_temperature(cli.TEMPERATURE_MIN)
    for t in (0, 1e-3, float("nan"), float("inf")):
        with pytest.raises(errors.UsageError, match="--temperature"):
            cli.check_temperature(t)


@pytest.mark.parametrize("value,named", [("NaN", "field 'temperature' is not a finite number: nan"),
                                         ('"hot"', "field 'temperature' is not a finite number: 'hot'"),
                                         ("1e-40", "the records' temperature must be a finite value >= 0.01")])
def test_records_temperature_checked(value, named, tiny_model, tmp_path, no_weights, monkeypatch, capsys):
    """entropy.py takes its temperature from the records: a NaN or tiny one there is a one-line error naming the
    row (unchecked, it would put NaN in summary.json and exit 0)."""
    path = tmp_path / "r.jsonl"
    path.write_text(f'{{"prompt": "p", "completion": "c", "temperature": {value}}}\n' * 2)
    code, _, err = run_main(monkeypatch, capsys, entropy,
                            ["--model", tiny_model, "--input", path, "--out", tmp_path / "o"])
    one_error(code, err, 2, path, named)
    assert not (tmp_path / "o").exists()


def test_bootstrap_in_chunks_draws_the_same_resamples():
    """bootstrap_ratio draws its resamples a chunk at a time: the same interval as one (n_boot, N) draw."""
    import numpy as np
    rng = np.random.default_rng(1)
    num, den = rng.random(5000), rng.random(5000) + 0.5
    idx = np.random.default_rng(7).integers(0, 5000, size=(2000, 5000))
    want = np.nanpercentile(num[idx].sum(1) / den[idx].sum(1), [2.5, 97.5]).tolist()
    est, ci = entropy.bootstrap_ratio(num, den, n_boot=2000, seed=7)  # 3 chunks of <= 838 resamples
    assert ci == want and est == pytest.approx(num.sum() / den.sum())


def test_prompt_longer_than_the_context(tiny_model, tmp_path, no_weights, monkeypatch, capsys):
    """evaluate.py refuses prompts that do not fit the model's context (1024 tokens) before generating;
    rl.py drops those longer than the context minus --max-new-tokens, and counts them."""
    long = " ".join(["7"] * 1100)  # digits are one token each
    data = write_jsonl(tmp_path / "m.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": long, "answer": "2"}])
    code, _, err = run_main(monkeypatch, capsys, evaluate, ["--model", tiny_model, "--benchmarks", "math500", "--data",
                                                       f"math500={data}", "--samples", "1", "--out", tmp_path / "o"])
    one_error(code, err, 2, data, "1 of 2 prompts do not fit the context", "(1024 tokens)", "math500 id 2")
    assert not (tmp_path / "o").exists()
    tok = common.load_tokenizer(tiny_model)
    args = rl.get_args(["--model", tiny_model, "--prompts", str(data), "--out", "o", "--rule", "format",
                        "--rollout-batch", "1", "--max-new-tokens", "24"])
    rows, n_long, why = rl.load_prompts(args, tok, None, ctx=1024)
    assert len(rows) == 1 and n_long == 1 and why == "1000 tokens: the context 1024 minus --max-new-tokens 24"
    assert preflight.model_context({"max_position_embeddings": 32768, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}) == 131072


# --- disks and paths ------------------------------------------------------------------------------------

def mount_tmpfs(d, opts):
    d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(options) -> a dir on a fresh tmpfs ("size=100k", "ro"), unmounted after the test; the test is
    skipped where mounting needs a root this process is not."""
    mounts = []

    def make(opts):
        d = tmp_path / f"fs{len(mounts)}"
        if not mount_tmpfs(d, opts):
            pytest.skip("mounting a tmpfs needs root")
        mounts.append(d)
        return d
    yield make
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def read_only(tmp_path, tmpfs):
    """A read-only dir: a read-only tmpfs as root, a chmod 555 dir otherwise."""
    if os.geteuid() == 0:
        yield tmpfs("ro,size=64k")
        return
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


@pytest.mark.parametrize("stage", ["sft", "rl", "evaluate", "grade", "reward", "entropy"])
def test_read_only_out_found_before_any_work(stage, read_only, tiny_model, inputs, tmp_path, no_loads,  # noqa: F811
                                             monkeypatch, capsys):
    out = read_only / ("o.jsonl" if stage in ("grade", "reward") else "o")
    module, argv = command(stage, tiny_model, inputs, tmp_path, ["--out", out])  # the last --out wins
    code, _, err = run_main(monkeypatch, capsys, module, argv)
    msg = one_error(code, err, 2, "--out", read_only)
    assert "read-only" in msg or "not writable" in msg


@contextlib.contextmanager
def file_size_limit(n):
    """RLIMIT_FSIZE for this process: a write past n bytes fails with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_file_size_limit_during_the_export(tiny_model, inputs, tmp_path, monkeypatch, capsys):  # noqa: F811
    """model.safetensors (137 KiB) over a 64 KiB file-size limit: exit 1, the export's path named, no temp."""
    out = tmp_path / "o"
    with file_size_limit(64 << 10):
        code, _, err = run_main(monkeypatch, capsys, sft,
                                sft_args(tiny_model, inputs["sft"], out, "--max-steps", "1")[1:])
    one_error(code, err, 1, f"cannot write the export into {out}", "File too large", "ulimit -f", "it needs 134.2 KiB")
    assert leftovers(out) == [] and not (out / "model.safetensors").exists() and not (out / "state").exists()


def test_full_disk_during_sft_export_and_state(tiny_model, inputs, tmpfs, monkeypatch, capsys):  # noqa: F811
    """A 100 KiB disk cannot take the export (137 KiB): exit 1 naming it. A 1100 KiB disk takes step 1's
    export and state (~820 KiB), then not step 2's state: exit 1 naming state.tmp, none left, state/ of step 1
    intact, the export of step 2 installed (an export ahead of the state is what --resume expects)."""
    out = tmpfs("size=100k") / "o"
    code, _, err = run_main(monkeypatch, capsys, sft, sft_args(tiny_model, inputs["sft"], out, "--max-steps", "1")[1:])
    one_error(code, err, 1, f"cannot write the export into {out}", "No space left on device", "needs about 134.2 KiB")
    assert leftovers(out) == [] and not (out / "model.safetensors").exists()
    out = tmpfs("size=1100k") / "o"
    code, _, err = run_main(monkeypatch, capsys, sft, sft_args(tiny_model, inputs["sft"], out, "--max-steps", "2",
                                                          "--keep-checkpoints", "1")[1:])
    one_error(code, err, 1, f"cannot write {out / 'state.tmp'}: No space left on device", "nothing half-written")
    assert leftovers(out) == [] and json.load(open(out / "state" / "COMPLETE"))["step"] == 1
    assert os.listdir(out / "checkpoints") == ["step-2"]


def test_full_disk_during_rl_state_save(tiny_model, inputs, tmpfs, monkeypatch, capsys):  # noqa: F811
    out = tmpfs("size=400k") / "o"
    code, _, err = run_main(monkeypatch, capsys, rl, rl_args(tiny_model, inputs["rl"], out, "--max-steps", "1")[1:])
    one_error(code, err, 1, f"cannot write {out / 'state.tmp'}: No space left on device")
    assert leftovers(out) == [] and not (out / "state").exists() and (out / "model.safetensors").exists()


def test_full_disk_reward_and_entropy_keep_the_previous_output(tiny_model, tmpfs, tmp_path, monkeypatch, capsys):
    """reward.py and entropy.py write through the temp-and-rename helpers: a full disk leaves the previous
    complete file(s), no temp file, and one line naming the path and what it needed."""
    disk = tmpfs("size=64k")
    recs = recs_file(tmp_path / "r.jsonl", n=400)  # ~50 KiB scored
    (disk / "s.jsonl").write_text("previous\n")
    (disk / "filler").write_bytes(b"x" * (40 << 10))
    code, _, err = run_main(monkeypatch, capsys, reward,
                            ["--input", recs, "--out", disk / "s.jsonl", "--rule", "refusal"])
    one_error(code, err, 1, f"cannot write {disk / 's.jsonl'}: No space left on device", "free there")
    assert (disk / "s.jsonl").read_text() == "previous\n" and leftovers(disk) == []
    (disk / "filler").unlink()
    (disk / "o").mkdir()
    (disk / "o" / "summary.json").write_text("previous\n")
    code, _, err = run_main(monkeypatch, capsys, entropy,
                            ["--model", tiny_model, "--input", recs_file(tmp_path / "e.jsonl"),
                             "--out", disk / "o", "--bootstrap", "10"])
    one_error(code, err, 1, f"cannot write {disk / 'o'}", "No space left on device")
    assert os.listdir(disk / "o") == ["summary.json"] and (disk / "o" / "summary.json").read_text() == "previous\n"


def test_planted_symlinks_are_never_followed(tiny_model, inputs, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Links at every temp path of an sft run (args.json.tmp -> a file outside, .export.tmp and
    .export.ready -> a dir outside, checkpoints -> a dir outside, removed by --overwrite): the run ends
    like any other and nothing outside --out changes (a followed link would overwrite the outside file with
    args.json and move the outside dir's files into --out)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (outside / "model.safetensors").write_text("not mine to move")
    out = tmp_path / "o"
    out.mkdir()
    for name, target in [("args.json.tmp", outside / "precious.txt"), (".export.tmp", outside),
                         (".export.ready", outside), ("checkpoints", outside), ("state.tmp", outside)]:
        (out / name).symlink_to(target)
    code, _, err = run_main(monkeypatch, capsys, sft, sft_args(tiny_model, inputs["sft"], out, "--max-steps", "1",
                                                          "--overwrite")[1:])
    assert code == 0, err
    assert sorted(os.listdir(outside)) == ["model.safetensors", "precious.txt"]
    assert (outside / "precious.txt").read_text() == "keep me"
    assert (outside / "model.safetensors").read_text() == "not mine to move"
    assert json.load(open(out / "args.json"))["max_steps"] == 1 and not any(p.is_symlink() for p in out.iterdir())
    assert os.path.getsize(out / "model.safetensors") > 100_000


def test_a_planted_lock_or_appended_file_link_is_refused(tiny_model, inputs, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A link at OUT/.lock or at a file the stages append to (metrics.jsonl, evaluate.py's NAME.jsonl) is
    refused with one line naming it, and its target is neither written nor created (a followed link would
    write the lock's pid into the target, and the appends would create it and write the records there)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "lock.txt").write_text("precious data")
    out = tmp_path / "o"
    out.mkdir()
    (out / ".lock").symlink_to(outside / "lock.txt")
    argv = sft_args(tiny_model, inputs["sft"], out, "--max-steps", "1")[1:]
    code, _, err = run_main(monkeypatch, capsys, sft, argv)
    one_error(code, err, 2, out / ".lock", "symbolic link")
    assert (outside / "lock.txt").read_text() == "precious data"
    (out / ".lock").unlink()
    (out / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")  # dangling: the append would create it
    code, _, err = run_main(monkeypatch, capsys, sft, argv)
    one_error(code, err, 2, out / "metrics.jsonl", "symbolic link")
    assert sorted(os.listdir(outside)) == ["lock.txt"]
    (outside / "n.jsonl").write_text("")
    (out / "n.jsonl").symlink_to(outside / "n.jsonl")
    with pytest.raises(errors.UsageError, match="n.jsonl is a symbolic link"):
        files.append_jsonl(out / "n.jsonl", {"id": 1})
    assert (outside / "n.jsonl").read_text() == ""


def test_writers_never_follow_a_link_and_clean_up(tiny_model, tmp_path, monkeypatch):
    """write_files removes a link at PATH.tmp (never its target); save_state does the same with state.tmp
    and state.old; a failed write removes every temp of its set and leaves every previous file."""
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    path = tmp_path / "a.json"
    (tmp_path / "a.json.tmp").symlink_to(outside)
    files.write_json(path, {"x": 1})
    assert json.load(open(path)) == {"x": 1} and outside.read_text() == "keep me"

    (tmp_path / "b.txt").write_text("old b")
    real_open = os.open

    def failing_open(p, *a, **k):  # the second file of the set hits a full disk
        if str(p).endswith("c.txt.tmp"):
            raise OSError(28, "No space left on device")
        return real_open(p, *a, **k)
    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(errors.DiskFull, match=re.escape(f"cannot write {tmp_path / 'c.txt'}: No space left on device")):
        files.write_files({tmp_path / "b.txt": "new b", tmp_path / "c.txt": "new c"})
    monkeypatch.setattr(os, "open", real_open)
    assert (tmp_path / "b.txt").read_text() == "old b" and not (tmp_path / "c.txt").exists()
    assert leftovers(tmp_path) == []

    d = tmp_path / "outside_dir"
    d.mkdir()
    (d / "keep").write_text("x")
    out = tmp_path / "o"
    out.mkdir()
    (out / "state.tmp").symlink_to(d)
    (out / "state.old").symlink_to(d)
    model = common.load_model(tiny_model)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save_state(out, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 1)
    checkpoint.save_state(out, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 2)
    assert os.listdir(d) == ["keep"] and json.load(open(out / "state" / "COMPLETE"))["step"] == 2
    assert sorted(os.listdir(out)) == ["state"]


# --- checks before work, stops on purpose --------------------------------------------------------------------

def test_max_kl_is_a_stop_message(tiny_model, inputs, tmp_path, monkeypatch, capsys):  # noqa: F811
    """--max-kl firing ends the run with exit 1 and one line (it was a RuntimeError traceback): the KL is 0 at
    step 1 (the policy is the reference) and positive after the first update (k2 >= 0; the entropy bonus
    gives a gradient when every reward is equal)."""
    out = tmp_path / "o"
    code, _, err = run_main(monkeypatch, capsys, rl, rl_args(tiny_model, inputs["rl"], out, "--max-kl", "1e-9",
                                                        "--max-steps", "2", "--save-every", "1", "--dump-every", "0",
                                                        "--entropy-coef", "0.1", "--kl-estimator", "k2")[1:])
    one_error(code, err, 1, "step 2: mean KL to the reference", "> --max-kl 1e-09", "last saved state")
    assert json.load(open(out / "state" / "COMPLETE"))["step"] == 1


def test_missing_record_fields_and_help_still_work(tmp_path, monkeypatch, capsys):
    """reward.py and evaluate.py go through cli_main: a data error is one line, --help still exits 0."""
    recs = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p"}])
    code, _, err = run_main(monkeypatch, capsys, reward, ["--input", recs, "--out", tmp_path / "s.jsonl", "--rule",
                                                     "format"])
    one_error(code, err, 2, recs, "row 1", "'completion'")
    code, out, _ = run_main(monkeypatch, capsys, evaluate, ["grade", "--help"])
    assert code == 0 and "--input" in out


def test_step_log_prints_a_short_line_and_writes_every_key(tmp_path, capsys):
    """cli.Logger: the console line carries the `show` keys, metrics.jsonl every key (as floats)."""
    log = cli.Logger(str(tmp_path), 10, show=("reward", "kl"))
    log.log(3, {"reward": 0.5, "kl": torch.tensor(0.25), "t_gen": 1.5, "n_reflect": 2})
    assert capsys.readouterr().out == "step 3/10 | reward 0.5 | kl 0.25\n"
    assert files.read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 3, "reward": 0.5, "kl": 0.25, "t_gen": 1.5,
                                                             "n_reflect": 2.0}]


def test_a_lone_surrogate_in_an_input_table_names_file_row_and_field(tmp_path, capsys):
    """JSON's "\\ud800" parses to a string no tokenizer takes: refused when the table is read, before any model
    loads, naming the file, the row and the field (a traceback from the tokenizer before)."""
    import files
    from errors import DataError
    (tmp_path / "d.jsonl").write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "hi \\ud800", "response": "x"}\n')
    (tmp_path / "p.json").write_text('[{"question": "x", "meta": {"note": "\\udfff"}}]')
    with pytest.raises(DataError, match=r"d.jsonl: row 2: field 'prompt': not valid Unicode"):
        files.read_jsonl(str(tmp_path / "d.jsonl"))
    with pytest.raises(DataError, match=r"p.json: row 1: field 'meta': not valid Unicode"):
        tables.read_table(str(tmp_path / "p.json"))
    assert files.read_jsonl(str(tmp_path / "d.jsonl"), appended=True)[1]["prompt"] == "hi \ud800"  # own records
