"""The tiny world end to end: `bash runs/tiny.sh --quick` (CI-sized) builds the world, trains base, SFT and RL,
evaluates all three on harmful, wrapped harmful, harmless look-alike and arithmetic prompts, analyses the entropy,
draws the training curves and writes the table. It runs TWICE, from scratch each time, side by side: the two
results.md files (and every generation record) must be byte-identical: the pipeline is reproducible to the
digit. The other tests check that every stage ran and wrote its files and that the table has its rows and
columns; the numbers of the quick run are not asserted (it trains for one epoch only)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

STAGES = ["sft.py", "rl.py", "evaluate.py", "reward.py", "entropy.py", "runs/make_world.py", "runs/report.py",
          "runs/curves.py"]
MODELS = ["base", "sft", "rl"]


def hf_dir_ok(d):
    names = set(os.listdir(d))
    return {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two independent `runs/tiny.sh --quick` runs (nothing shared: each builds its own world and models),
    started side by side; the second with a different PYTHONHASHSEED in the environment and one stage at a
    time, to show neither leaks into the results."""
    missing = [s for s in STAGES if not (ROOT / s).exists()]
    if missing:
        pytest.skip(f"stage scripts not written yet: {', '.join(missing)}")
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    procs = []
    for i, extra in enumerate([{}, {"PYTHONHASHSEED": "123", "TINY_JOBS": "1", "OMP_NUM_THREADS": "2"}]):
        out = tmp_path_factory.mktemp(f"tiny{i}")
        env = dict(os.environ, TINY_OUT=str(out), PYTHON=sys.executable, **extra)
        env.pop("TRITON_INTERPRET", None)
        procs.append((out, subprocess.Popen(["bash", "runs/tiny.sh", "--quick"], cwd=ROOT, env=env, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    runs = []
    for out, p in procs:
        stdout, stderr = p.communicate(timeout=1200)
        assert p.returncode == 0, f"runs/tiny.sh --quick failed ({p.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}"
        runs.append((out, stdout))
    return runs


@pytest.fixture(scope="module")
def tiny_run(tiny_runs):
    return tiny_runs[0]


def test_two_runs_are_identical_to_the_digit(tiny_runs):
    (a, _), (b, _) = tiny_runs
    assert (a / "results.md").read_text() == (b / "results.md").read_text()
    for m in MODELS:  # and the generations behind the table, record by record
        for f in ("attaq.jsonl", "math500.jsonl", "harmless/attaq.jsonl", "wrapped/attaq.jsonl"):
            ra, rb = (open(x / "eval" / m / f).read().splitlines() for x in (a, b))
            assert ra == rb, f"eval/{m}/{f} differs between two identical runs"
    keep = ("reward", "kl", "entropy", "len", "loss", "grad_norm")  # not the timings
    ma, mb = ([{k: r[k] for k in keep if k in r} for r in map(json.loads, open(x / "rl" / "metrics.jsonl"))]
              for x in (a, b))
    assert ma == mb


def test_world_files(tiny_run):
    out, _ = tiny_run
    w = out / "world"
    star1 = json.load(open(w / "star1.json"))
    assert star1 and {"id", "question", "response", "category", "source", "score"} <= set(star1[0])
    assert all("</think>" in r["response"] for r in star1)
    math = [json.loads(line) for line in open(w / "math500.jsonl")]
    assert math and {"problem", "solution", "answer", "unique_id"} <= set(math[0])
    attaq = list(csv.DictReader(open(w / "attaq.csv")))
    assert attaq and set(attaq[0]) == {"label", "input", "additional_info"}
    harmless = list(csv.DictReader(open(w / "harmless.csv")))
    assert harmless and set(harmless[0]) == {"label", "input", "additional_info"}
    assert all(r["label"] == "harmless" and r["additional_info"].startswith("tiny-world/lookalike/") for r in harmless)
    base = [json.loads(line) for line in open(w / "base.jsonl")]
    # the splits are disjoint: no held-out prompt is trained on
    train = {r["question"] for r in base} | {r["question"] for r in star1}
    assert not train & {r["input"] for r in attaq}
    assert not train & {r["input"] for r in harmless}
    assert not {r["input"] for r in attaq} & {r["input"] for r in harmless}
    # the wrapped harmful prompts: other harmful requests, inside wrappers that no training text contains
    import runs.make_world as mw
    wrapped = list(csv.DictReader(open(w / "wrapped.csv")))
    assert wrapped and set(wrapped[0]) == {"label", "input", "additional_info"}
    assert {r["additional_info"].split("/")[2] for r in wrapped} == set(mw.WRAPPERS)
    assert not train & {r["input"] for r in wrapped}
    inner = [r["input"] for r in wrapped]
    assert not [q for q in (r["input"] for r in attaq) if any(q in x for x in inner)]  # not the attaq requests
    train_text = " ".join(r["question"] + r["response"] for r in base) + " ".join(
        r["question"] + r["response"] for r in star1) + " ".join(
        p["prompt"] + p["completion"] for p in map(json.loads, open(w / "rm_pairs.jsonl")))
    assert not [t for t in mw.WRAPPERS.values() if t.replace("{request}", "").strip()[:40] in train_text]
    # the held-out look-alikes' targets never occur in any training text (base corpus, SFT set, RM pairs)
    held = {ts[0] for entries in mw.LOOKALIKES.values() for _, _, ts in entries}
    seen = " ".join(r["question"] for r in base) + " ".join(r["question"] for r in star1) + " ".join(
        json.loads(line)["prompt"] for line in open(w / "rm_pairs.jsonl"))
    assert not [t for t in held if t in seen]
    assert any(t in r["input"] for r in harmless for t in held)
    assert not {r["question"].split("\n")[0] for r in base} & {r["problem"] for r in math}
    assert hf_dir_ok(w / "init") and hf_dir_ok(w / "rm")
    rm_cfg = json.load(open(w / "rm" / "config.json"))
    assert rm_cfg["architectures"] == ["Qwen3ForSequenceClassification"] and len(rm_cfg["id2label"]) == 1


def test_every_stage_wrote_its_files(tiny_run):
    out, stdout = tiny_run
    for m in MODELS:
        assert hf_dir_ok(out / m), f"{m}: no Hugging Face checkpoint"
        assert (out / m / "args.json").exists() and (out / m / "metrics.jsonl").exists()
        ev = out / "eval" / m
        summary = json.load(open(ev / "summary.json"))["benchmarks"]
        assert {"attaq", "math500"} <= set(summary)
        for held in ("harmless", "wrapped"):
            assert json.load(open(ev / held / "summary.json"))["benchmarks"]["attaq"]["n"] == len(
                list(csv.DictReader(open(out / "world" / f"{held}.csv"))))
        for b in ("attaq", "math500"):
            recs = [json.loads(line) for line in open(ev / f"{b}.jsonl")]
            assert recs and all("completion" in r and "score" in r for r in recs)
        ent = json.load(open(out / "entropy" / m / "summary.json"))
        assert {s["dataset"] for s in ent} == {"harmful", "arithmetic"}
    rl_metrics = [json.loads(line) for line in open(out / "rl" / "metrics.jsonl")]
    assert rl_metrics and all("reward" in x for x in rl_metrics)
    for png in ("entropy_reflection.png", "entropy_hist.png", "curves_base.png", "curves_sft.png", "curves_rl.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ["world", "base", "sft", "rl", "eval-base", "eval-sft", "eval-rl", "harmless-rl", "wrapped-rl",
                  "entropy-base", "curves", "table"]:
        assert stage in stdout


def test_table_has_three_rows(tiny_run):
    out, stdout = tiny_run
    text = (out / "results.md").read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "model" and rows[1:] == MODELS
    head = [c.strip() for c in next(x for x in text.splitlines() if x.startswith("| model")).split("|")[1:-1]]
    assert head[1:5] == ["refusal % harmful", "refusal % wrapped harmful", "refusal % harmless look-alikes",
                         "refusal % arithmetic"]
    for line in text.splitlines():
        if line.startswith(("| base", "| sft", "| rl")):
            assert line.count("|") == text.splitlines()[2].count("|")
    assert "| base" in stdout  # the table is printed too


def test_the_refusal_rate_splits_each_record_by_its_thinking():
    """runs/report.py reads a refusal off each record's answer, split by the record's own `thinking`: an
    answer-only record (thinking off) is all answer, so its refusal counts; with thinking on, a completion
    that never closes its thinking has no answer, hence no refusal; a record without the field: thinking on."""
    from runs import report
    no = "I'm sorry, but I can't help with that."
    recs = [{"completion": no, "thinking": False}, {"completion": no, "thinking": True},
            {"completion": f"<think>\nA harmful request.\n</think>\n\n{no}"}, {"completion": "Sure, here it is."}]
    rate, se, n = report.refusal_rate(recs)
    assert (rate, n) == (0.5, 4) and se == (0.5 * 0.5 / 4) ** 0.5
