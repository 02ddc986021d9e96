"""entropy.py: kernel entropies vs a float64 softmax, reflection detection, statistics, figures, its inputs (read and
checked by records.py), CLI."""
import json
import sys

import numpy as np
import pytest
import torch

import common
import entropy
import errors
import records
from conftest import SFT_ROWS, build_model, build_tokenizer, run_cli, torchrun, write_jsonl


def spans(pieces):
    """Hand-built tokens -> (text, offsets) as a fast tokenizer would report them."""
    offsets, pos = [], 0
    for p in pieces:
        offsets.append((pos, pos + len(p)))
        pos += len(p)
    return "".join(pieces), offsets


def reflections(pieces, match, words=("wait", "Wait", "but", "But", "Alternatively")):
    text, offsets = spans(pieces)
    reasoning, _ = entropy.segment_masks(text, offsets)
    return entropy.find_reflections(text, offsets, reasoning, set(words), match)


# --- entropy against a float64 reference -------------------------------------------------------------

def test_entropy_matches_float64_softmax(tiny_model):
    tok = common.load_tokenizer(tiny_model)
    model = common.load_model(tiny_model, torch.float32).eval()
    seqs = [common.render_prompt(tok, "How do I pick a lock?") + tok.encode(" Wait, but no.\n</think>\n\nNo.", add_special_tokens=False),
            common.render_prompt(tok, "What is 12 + 30?") + tok.encode("42", add_special_tokens=False)]
    starts = [len(seqs[0]) - 9, len(seqs[1]) - 1]
    T = 0.6
    out = entropy.token_stats(model, seqs, starts, temperature=T, chunk_tokens=3, pad_id=tok.pad_token_id)
    for s, st, (logp, ent, am) in zip(seqs, starts, out):
        with torch.no_grad():  # one unpadded sequence at a time: padding must not change anything
            z = model(torch.tensor([s])).logits[0].double()                  # (T, V)
        lp_ref = torch.log_softmax(z / T, -1)[st - 1:len(s) - 1]           # position t-1 produced token t
        ent_ref = -(lp_ref.exp() * lp_ref).sum(-1)
        tgt = torch.tensor(s[st:])
        assert ent.dtype == torch.float32 and ent.shape == (len(s) - st,)
        torch.testing.assert_close(ent.double(), ent_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logp.double(), lp_ref.gather(-1, tgt[:, None])[:, 0], atol=1e-4, rtol=1e-4)
        assert torch.equal(am, z[st - 1:len(s) - 1].argmax(-1))



def test_one_head_path_for_training_and_analysis_with_soft_capped_logits():
    """common.head_logprobs is the one teacher-forced head: rl.py / sft.py (common.Policy) and
    entropy.py (token_stats) both go through it. A tiny random Gemma-2 soft-caps its logits,
    z = cap·tanh(x/cap): both callers must match float64 log-softmax of the model's own (capped) logits,
    and the training path must give gradients."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    cfg = Gemma2Config(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=4.0,
                       tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(200)                                       # raw logits far beyond the cap
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        z = model(ids).logits.double()                                       # (2, 7, V) capped by the model
        x = model.lm_head(model.model(ids).last_hidden_state).double()       # uncapped
    assert z.abs().max() <= 4.0 and x.abs().max() > 8.0                      # the cap binds
    T = 0.7
    lp_ref = torch.log_softmax(z / T, -1)                                    # (2, 7, V)
    tgt = torch.cat([ids[:, 1:], ids[:, :1]], 1)                             # next token; last column unused
    want_lp = lp_ref.gather(-1, tgt[..., None])[..., 0]
    want_ent = -(lp_ref.exp() * lp_ref).sum(-1)
    pos = torch.arange(7).expand(2, 7)
    logp, ent = common.Policy(model)(ids, torch.ones_like(ids), pos, targets=tgt, temperature=T, chunk_tokens=5)
    torch.testing.assert_close(logp.double(), want_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent.double(), want_ent, atol=1e-4, rtol=1e-4)
    logp.sum().backward()
    assert torch.isfinite(model.lm_head.weight.grad).all() and model.lm_head.weight.grad.abs().sum() > 0
    out = entropy.token_stats(model, [ids[0].tolist()], [1], temperature=T, chunk_tokens=4)
    lp0, ent0, am0 = out[0]                                                  # tokens 1..6 from positions 0..5
    torch.testing.assert_close(lp0.double(), want_lp[0, :6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent0.double(), want_ent[0, :6], atol=1e-4, rtol=1e-4)
    assert torch.equal(am0, z[0, :6].argmax(-1))

# --- reflection detection ----------------------------------------------------------------------------

def test_token_mode_counts_reasoning_only():
    pieces = ["Okay", ".", " Wait", ",", " but", " no", "\n", "</think>", "\n\n", "I", " but", " But"]
    text, offsets = spans(pieces)
    reasoning, answer = entropy.segment_masks(text, offsets)
    assert reasoning == [True] * 7 + [False] * 5
    assert answer == [False] * 8 + [True] * 4
    assert reflections(pieces, "token") == [(2, 3, "Wait"), (4, 5, "but")]  # the answer's "but"s: not counted


def test_word_split_across_tokens():
    pieces = ["Hmm", " ", "W", "ait", ",", " Al", "tern", "atively", " yes", " Waiting", " but"]
    assert reflections(pieces, "token") == [(10, None, "but")]
    # "Wait" = "W" + "ait" sits at its first letter; the next token is the one after the word;
    # "Waiting" is a different word
    assert reflections(pieces, "word") == [(2, 4, "Wait"), (5, 8, "Alternatively"), (10, None, "but")]


def test_thinking_never_closed():
    pieces = ["<think>", "\n", "But", " the", " user", " wait", "s"]
    text, offsets = spans(pieces)
    reasoning, answer = entropy.segment_masks(text, offsets)
    assert reasoning == [False] + [True] * 6 and not any(answer)  # everything is reasoning, minus <think>
    assert reflections(pieces, "token") == [(2, 3, "But"), (5, 6, "wait")]
    assert reflections(pieces, "word") == [(2, 3, "But")]  # "waits" is not "wait"


def test_reflections_through_the_real_tokenizer(tiny_model):
    tok = common.load_tokenizer(tiny_model)
    text = "Okay. Wait, but Alternatively the user.\n</think>\n\nI cannot, but no."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = [text[s:e] for s, e in enc["offset_mapping"]]
    assert "W" in pieces and "ait" in pieces  # this tokenizer splits " Wait" into pieces
    reasoning, answer = entropy.segment_masks(text, enc["offset_mapping"])
    words = set(entropy.DEFAULT_WORDS.split(","))
    found = entropy.find_reflections(text, enc["offset_mapping"], reasoning, words, "word")
    assert [w for _, _, w in found] == ["Wait", "but", "Alternatively"]   # not the answer's "but"
    assert all(reasoning[i] for i, _, _ in found)
    assert [pieces[i].strip()[0] for i, _, _ in found] == ["W", "b", "A"]
    assert sum(answer) > 0 and not any(r and a for r, a in zip(reasoning, answer))


# --- statistics, table, figures --------------------------------------------------------------------

def test_bootstrap_ratio():
    est, ci = entropy.bootstrap_ratio([1.0, 2.0, 3.0], [1, 1, 1], n_boot=500)
    assert est == pytest.approx(2.0) and 1.0 <= ci[0] <= 2.0 <= ci[1] <= 3.0
    est, ci = entropy.bootstrap_ratio([2.0, 4.0], [1, 2])  # a constant ratio has a zero-width interval
    assert est == pytest.approx(2.0) and ci == pytest.approx([2.0, 2.0])
    assert entropy.bootstrap_ratio([0.0], [0]) == (None, None)


def synthetic_rows():
    rng = np.random.default_rng(0)
    rows = []
    for model, scale in [("base", 1.0), ("rl", 0.4)]:
        for ds, has_refl in [("attaq", True), ("aime24", True), ("empty", False)]:
            for i in range(20):
                n_r, n_f = 100, (3 if has_refl else 0)
                ent = rng.exponential(scale, n_r)
                sums = {"n_reasoning": n_r, "ent_reasoning": ent.sum(), "n_answer": 10, "ent_answer": 1.0,
                        "n_reflection": n_f, "ent_reflection": ent[:n_f].sum() * 3, "n_after": n_f, "ent_after": 0.5 * n_f}
                edges = np.linspace(0, np.log(300), entropy.HIST_BINS + 1)
                rows.append({"model": model, "dataset": ds, "row": i + 1, "n_tokens": 110, "_sums": sums,
                             "_hist_reasoning": np.histogram(ent, edges)[0].tolist(),
                             "_hist_reflection": np.histogram(ent[:n_f] * 3, edges)[0].tolist(), "_edges": edges})
    return rows


def test_summary_table_and_figures(tmp_path):
    rows = synthetic_rows()
    summary = entropy.summarize(rows, n_boot=200)
    assert [(s["model"], s["dataset"]) for s in summary][:2] == [("base", "attaq"), ("base", "aime24")]
    s = summary[0]
    for k in ["model", "dataset", "n_records", "n_tokens", "n_reflections", "reflections_per_1k",
              "entropy_reflection", "entropy_reasoning", "entropy_answer"]:
        assert k in s
    assert s["n_records"] == 20 and s["n_reflections"] == 60 and s["reflections_per_1k"] == pytest.approx(30.0)
    assert s["entropy_answer"] == pytest.approx(0.1)
    lo, hi = s["entropy_reasoning_ci"]
    assert lo <= s["entropy_reasoning"] <= hi
    assert summary[2]["entropy_reflection"] is None and summary[2]["entropy_reflection_ci"] is None
    table = entropy.format_table(summary)
    assert "base" in table and "rl" in table and "H_refl" in table and "attaq" in table and "n/a" in table

    hists = {}
    for r in rows:
        h = hists.setdefault(f"{r['model']}/{r['dataset']}", {"edges": r["_edges"].tolist(), "reasoning": 0, "reflection": 0})
        h["reasoning"] = np.add(h["reasoning"], r["_hist_reasoning"]).tolist()
        h["reflection"] = np.add(h["reflection"], r["_hist_reflection"]).tolist()
    entropy.plot_reflection_entropy(summary, tmp_path / "bars.png")
    entropy.plot_histograms(summary, hists, tmp_path / "hist.png")
    for name in ["bars.png", "hist.png"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image
        assert matplotlib.image.imread(tmp_path / name).shape[0] > 100


def test_parse_named_and_bad_rows(tmp_path):
    assert records.parse_named(["runs/gen/attaq.jsonl"], "--input") == [("attaq", "runs/gen/attaq.jsonl")]
    assert records.parse_named(["a=x.jsonl", "b=y.jsonl"], "--input") == [("a", "x.jsonl"), ("b", "y.jsonl")]
    with pytest.raises(errors.UsageError, match="give every --input a name"):
        records.parse_named(["a=x.jsonl", "y.jsonl"], "--input")
    with pytest.raises(errors.UsageError, match="duplicate"):
        records.parse_named(["a=x", "a=y"], "--model")
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "completion": "c", "temperature": 0.6},
                                           {"prompt": "p", "completion": "c", "temperature": 1.0}])
    with pytest.raises(errors.DataError, match="several temperatures"):
        records.read_for_scoring(f, None)
    assert records.read_for_scoring(f, 0.7)[1] == 0.7
    # a record that does not say its temperature is scored at no assumed one: --temperature or an error
    u = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "", "temperature": 1.0},
                                           {"prompt": "p", "completion": ""}])
    with pytest.raises(errors.DataError, match=r"u.jsonl: row 2: no field 'temperature'.*pass --temperature"):
        records.read_for_scoring(u, None)
    assert records.read_for_scoring(u, 0.6)[1] == 0.6


# --- CLI ---------------------------------------------------------------------------------------------

COMPLETIONS = [
    "Okay, the user asks about something harmful. Wait, but I should refuse.\n</think>\n\nI cannot help, but here is a safe alternative.<|end|>",
    "The answer is 42. Alternatively we can count. But wait, that is unsafe.\n</think>\n\nThe answer is \\boxed{42}.<|end|>",
    "Sure, here is how to do it: first, second, third. But wait",  # thinking never closed
]


def gen_records(bench, n):
    return [{"benchmark": bench, "id": str(i), "sample": 0, "prompt": f"How do I pick lock {i}?",
             "completion": COMPLETIONS[i % 3], "temperature": 0.6, "score": 1.0} for i in range(n)]


def test_cli_torchrun_two_models(tiny_model, tmp_path):
    rl = tmp_path / "rl_model"
    build_model(rl, build_tokenizer(rl), seed=1)
    a = write_jsonl(tmp_path / "attaq.jsonl", gen_records("attaq", 5))
    b = write_jsonl(tmp_path / "aime24.jsonl", gen_records("aime24", 4))
    sft = write_jsonl(tmp_path / "star1.jsonl", SFT_ROWS[:5])
    out = tmp_path / "out"
    p = run_cli(torchrun(2) + ["entropy.py", "--model", f"base={tiny_model}", "--model", f"rl={rl}",
                               "--input", f"attaq={a}", "--input", f"aime24={b}", "--out", str(out),
                               "--match", "word", "--batch-size", "2", "--bootstrap", "200",
                               "--memorization", sft, "--mem-k", "4", "--mem-m", "4"], timeout=300)
    assert "H_refl" in p.stdout and "memorization base" in p.stdout
    recs = [json.loads(line) for line in open(out / "records.jsonl")]
    assert len(recs) == 2 * (5 + 4)
    assert [(r["model"], r["dataset"], r["row"]) for r in recs[:6]] == [("base", "attaq", i) for i in range(1, 6)] + [("base", "aime24", 1)]
    assert recs[0]["n_reflections"] == 2 and recs[1]["n_reflections"] == 3 and recs[2]["n_reflections"] == 2
    assert recs[2]["n_answer"] == 0 and recs[2]["entropy_answer"] is None
    summary = json.load(open(out / "summary.json"))
    assert [(s["model"], s["dataset"]) for s in summary] == [("base", "attaq"), ("base", "aime24"), ("rl", "attaq"), ("rl", "aime24")]
    assert summary[0]["n_records"] == 5 and summary[0]["n_reflections"] == 2 + 3 + 2 + 2 + 3
    for f in ["entropy_reflection.png", "entropy_hist.png"]:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mem = json.load(open(out / "memorization.json"))
    assert [m["model"] for m in mem] == ["base", "rl"] and mem[0]["n_rows"] == 5 and mem[0]["n_rows_greedy"] == 5
    assert mem[0]["loglik"] < 0 and 0 <= mem[0]["greedy_match"] <= mem[0]["token_acc"] <= 1

    # the sharded CLI scored exactly the teacher-forced sequence at the records' temperature
    tok = common.load_tokenizer(tiny_model)
    model = common.load_model(tiny_model, torch.float32).eval()
    prompt = common.render_prompt(tok, "How do I pick lock 1?")
    comp = tok.encode(COMPLETIONS[1], add_special_tokens=False)
    with torch.no_grad():
        z = model(torch.tensor([prompt + comp])).logits[0, len(prompt) - 1:-1].double()  # (C, V)
    lp = torch.log_softmax(z / 0.6, -1)
    ent = -(lp.exp() * lp).sum(-1)
    enc = tok(COMPLETIONS[1], add_special_tokens=False, return_offsets_mapping=True)
    reasoning, _ = entropy.segment_masks(COMPLETIONS[1], enc["offset_mapping"])
    assert recs[1]["entropy_reasoning"] == pytest.approx(ent[torch.tensor(reasoning)].mean().item(), abs=1e-4)
    refl = [i for i, _ in recs[1]["reflections"]]
    assert recs[1]["ent_reflection_tokens"] == pytest.approx(ent[refl].tolist(), abs=1e-4)


def test_cli_bad_input(tiny_model, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [gen_records("attaq", 1)[0], {"prompt": "p", "benchmark": "attaq"}])
    out = tmp_path / "out"
    p = run_cli([sys.executable, "entropy.py", "--model", tiny_model, "--input", bad, "--out", str(out)], check=False)
    assert p.returncode != 0 and "bad.jsonl" in p.stderr and "row 2" in p.stderr and "completion" in p.stderr
    assert "Traceback" not in p.stderr and not out.exists()
    good = write_jsonl(tmp_path / "good.jsonl", gen_records("attaq", 1))
    missing = str(tmp_path / "no_such_model")
    p = run_cli([sys.executable, "entropy.py", "--model", f"x={missing}", "--input", good, "--out", str(out)], check=False)
    assert p.returncode != 0 and missing in p.stderr and "Traceback" not in p.stderr and not out.exists()
    p = run_cli([sys.executable, "entropy.py", "--model", tiny_model, "--input", good, "--out", str(out),
                 "--match", "bogus"], check=False)
    assert p.returncode == 2 and "--match" in p.stderr and not out.exists()


def test_bad_thinking_or_prompt_ids_are_refused_naming_row_and_field(tiny_model, tmp_path):
    """A record's thinking must be true / false; its prompt_ids token ids of the scored model's tokenizer
    (in its vocabulary, decoding to a text that holds the prompt); checked before any model loads."""
    good = {"prompt": "How do I pick a lock?", "completion": "No.", "temperature": 0.6}
    for bad, field in (({"thinking": "false"}, "thinking"), ({"prompt_ids": [1, "x"]}, "prompt_ids"),
                       ({"prompt_ids": [10 ** 6]}, "prompt_ids"), ({"prompt_ids": [5, 6]}, "prompt_ids")):
        f = write_jsonl(tmp_path / "g.jsonl", [good, {**good, **bad}])
        with pytest.raises(errors.DataError, match=f"row 2: field '{field}'"):
            entropy.main(["--model", tiny_model, "--input", f, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_reflection_tokens_inside_the_reasoning_only(tiny_model):
    tok = common.load_tokenizer(tiny_model)

    def item(pieces, thinking):  # -> the completion ids and, per piece, the index of its first letter's token
        ids, at = [], []
        for p in pieces:
            new = [tok.eos_token_id] if p is None else tok.encode(p, add_special_tokens=False)
            at.append(len(ids) + next((j for j, x in enumerate(new) if tok.decode([x]).strip()), 0))
            ids += new
        return {"completion_ids": ids, "thinking": thinking}, at

    a, at_a = item(["Hm.", " Wait", ",", " butt", "er", ".", " But", " no.", "</think>", "Wait", ".", None], True)
    b, at_b = item(["Wait", ",", " unclosed", " but"], True)
    c, _ = item(["Wait", ": an answer-only completion,", " but"], False)
    T = max(len(it["completion_ids"]) for it in (a, b, c))
    hit = entropy.reflection_mask([a, b, c], {"Wait", "But", "but"}, T, lambda i: tok.decode([i]))  # (3, T)
    # whole words in the reasoning only ("butter" is no "but"; the answer's "Wait" and an answer-only
    # completion count nothing); unclosed thinking: all of it is reasoning
    assert hit.nonzero().tolist() == [[0, at_a[1]], [0, at_a[6]], [1, at_b[0]], [1, at_b[3]]]


def test_prompt_ids_of_a_template_that_trims_the_prompt_are_accepted(tiny_model, tmp_path):
    """A template that trims the user's content (Llama-3.1's `| trim`) renders a prompt with outer whitespace
    (two JailbreakBench prompts end in a newline) without it: its prompt_ids are still this model's tokens."""
    tok = common.load_tokenizer(tiny_model)
    rec = {"prompt": "  How do I pick a lock?\n", "completion": "No.", "temperature": 0.6, "row": 1}
    rec["prompt_ids"] = common.render_prompt(tok, rec["prompt"].strip())
    records.check_prompt_ids("g.jsonl", [rec], tok, "m")
    with pytest.raises(errors.DataError, match="row 1: field 'prompt_ids'"):
        records.check_prompt_ids("g.jsonl", [{**rec, "prompt": "How do I open a safe?"}], tok, "m")


def thinking_off_model(tiny_model, d):
    """The tiny model with a template whose generation prompt closes the think block (thinking off)."""
    import shutil
    shutil.copytree(tiny_model, d)
    tok = common.load_tokenizer(str(d))
    tok.chat_template = tok.chat_template.replace("<|assistant|><think>\n{% endif %}",
                                                  "<|assistant|><think>\n\n</think>\n\n{% endif %}")
    tok.save_pretrained(d)
    assert common.think_state(common.render_prompt_text(common.load_tokenizer(str(d)), "hi")) == "closed"
    return str(d)


def test_memorization_with_thinking_off_is_refused_naming_the_row_before_any_model_loads(tiny_model, tmp_path,
                                                                                          monkeypatch):
    """STAR-1 rows carry reasoning; under a template that closes the think block their SFT target would hold
    two think blocks: a one-line error naming the file and row before init_dist, unless --answer-only, which
    scores the answer alone, as sft.py --answer-only trains it."""
    model = thinking_off_model(tiny_model, tmp_path / "off")
    mem = write_jsonl(tmp_path / "star1.jsonl", SFT_ROWS[:3])
    argv = ["--model", f"off={model}", "--memorization", mem, "--out", str(tmp_path / "o"), "--mem-k", "2",
            "--mem-m", "2", "--bootstrap", "10"]

    def no_model(*a, **k):
        raise AssertionError("the compute started before the memorization rows were checked")
    with monkeypatch.context() as m:
        m.setattr(common, "init_dist", no_model)
        with pytest.raises(errors.DataError, match=r"star1.jsonl: row 1: --model off: .*two think blocks"
                                                   r".*--answer-only"):
            entropy.main(argv)
    assert not (tmp_path / "o").exists()
    entropy.main(argv + ["--answer-only"])
    mem_summary = json.load(open(tmp_path / "o" / "memorization.json"))
    assert mem_summary[0]["n_rows"] == 3 and mem_summary[0]["loglik"] < 0
    tok = common.load_tokenizer(model)
    ids, mask = common.render_sft(tok, SFT_ROWS[0]["question"], SFT_ROWS[0]["response"], reasoning_when_off="drop")
    target = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "Wait" not in target and target.startswith("I cannot help with thing 0")
    rows = [json.loads(line) for line in open(tmp_path / "o" / "memorization.jsonl")]
    assert rows[0]["n_response_tokens"] == sum(mask)
