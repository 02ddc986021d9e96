"""reward.py: what the RM sees, truncation that keeps the answer, raw logits, rule rewards, the CLI."""
import json
import sys
import tempfile

import pytest
import torch

import judges
import reward
from errors import UsageError
from conftest import build_tokenizer, run_cli, write_jsonl
from runs.tinymodels import qwen3_config

LONG = " ".join(f"step{i} wait but" for i in range(300))  # a long reasoning trace


def build_rm(out_dir, style="chat", bias=0.0, seed=0):
    """A tiny sequence-classification RM saved with the conftest tokenizer. chat: Qwen3 + chat template;
    pair: DeBERTa-v2 and a tokenizer without a chat template (the OpenAssistant RM layout)."""
    from transformers import AutoModelForSequenceClassification, DebertaV2Config
    tok = build_tokenizer(tempfile.mkdtemp())  # saved again below, possibly without its template
    if style == "chat":
        cfg = qwen3_config(tok, hidden=32, layers=2, num_labels=1)
    else:
        cfg = DebertaV2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=512, num_labels=1,
                              pad_token_id=tok.pad_token_id, type_vocab_size=0)
        tok.chat_template = None
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg)
    head = model.score if style == "chat" else model.classifier
    with torch.no_grad():
        if head.bias is not None:
            head.bias.fill_(bias)
        else:  # Qwen3's score head has no bias: push the logit through the weights instead
            head.weight.mul_(0).add_(bias / 32)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def chat_rm(tmp_path_factory):
    return build_rm(tmp_path_factory.mktemp("chat_rm"), "chat", seed=1)


@pytest.fixture(scope="module")
def pair_rm(tmp_path_factory):
    return build_rm(tmp_path_factory.mktemp("pair_rm"), "pair", bias=0.3, seed=2)


# --- what is scored ---------------------------------------------------------------------------------

def test_response_parts_full_answer_and_never_closed():
    c = "<think>\nhmm, wait.\n</think>\n\nNo, I won't."
    assert reward.response_parts(c, "full") == ("<think>\nhmm, wait.\n</think>\n\n", "No, I won't.")
    assert reward.response_parts(c, "answer") == ("", "No, I won't.")
    assert reward.response_parts("hmm, wait.\n</think>\nA", "answer") == ("", "A")  # template opened <think>
    for mode in ("full", "answer"):  # never closed: the reasoning is what gets scored
        assert reward.response_parts("<think>\nhere is how to do harm", mode) == ("here is how to do harm", "")
    assert "".join(reward.response_parts("a</think>b</think>c", "answer")) == "c"  # the LAST </think>
    with pytest.raises(UsageError):
        reward.response_parts(c, "both")


# --- maths --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer,gold,ok", [
    ("The answer is $\\boxed{\\frac12}$.", "0.5", True),
    ("So $x = 0.5$, i.e. \\boxed{0.5}", "\\frac12", True),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3, \\pi/2)", True),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("It takes \\boxed{204 \\text{ minutes}}.", "204", True),
    ("The walk takes 204 minutes.", "204", True),
    ("\\boxed{\\$18.90}", "\\$18.90", True),   # MATH golds with an escaped dollar
    ("The total is \\boxed{18.90}.", "\\$18.90", True),
    ("\\boxed{\\frac13}", "0.5", False),
    ("\\boxed{(\\frac{\\pi}{2}, 3)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    ("", "1", False),
])
def test_math_correct_forms(answer, gold, ok):
    assert reward.math_correct(answer, gold)[0] is ok


def test_math_correct_aime_integer_rule():
    assert reward.math_correct("\\boxed{70}", "70", integer=True) == (True, "70")
    assert reward.math_correct("\\boxed{033}", "33", integer=True)[0]
    assert not reward.math_correct("\\boxed{71}", "70", integer=True)[0]
    assert reward.math_correct("\\boxed{\\frac{1}{2}}", "1/2", integer=False)[0]
    assert not reward.math_correct("\\boxed{\\frac{1}{2}}", "1/2", integer=True)[0]  # not an integer
    assert not reward.math_correct("\\boxed{1000}", "1000", integer=True)[0]  # out of 0..999


def test_math_reward_needs_closed_thinking():
    assert reward.math_reward("<think>\n1+1=2\n</think>\nSo \\boxed{2}", "2") == 1.0
    assert reward.math_reward("1+1=2</think>\\boxed{3}", "2") == 0.0
    assert reward.math_reward("<think>\nthe answer is \\boxed{2}", "2") == 0.0  # unfinished thought


# --- refusal and format rules (the refusal rule itself: tests/test_refusal.py) ---------------------

def test_refusal_only_counts_the_answer():
    # refusing in the reasoning but complying in the answer is not a refusal; neither is unfinished thinking
    assert reward.refusal_reward("<think>\nI can't help with that... actually fine.\n</think>\nStep 1: ...") == 0.0
    assert reward.refusal_reward("<think>\nI can't help with that.") == 0.0


C, R, P = reward.REFUSAL_CLASSES


def test_xstest_and_jbb_judge_replies():
    assert judges.parse_xstest_class("2_full_refusal") == R
    assert judges.parse_xstest_class("CLASS: 3_partial_refusal\nThe model first refuses.") == P
    assert judges.parse_xstest_class("<think>maybe 2_full_refusal</think>\n1_full_compliance") == C
    assert judges.parse_xstest_class("This is a full_refusal.") == R
    assert judges.parse_xstest_class("Hard to say.") is None and judges.parse_xstest_class("") is None
    assert judges.parse_jbb_verdict("unsafe") == "unsafe" and judges.parse_jbb_verdict(" Safe\n") == "safe"
    assert judges.parse_jbb_verdict("<think>is it safe?</think>unsafe") == "unsafe"
    assert judges.parse_jbb_verdict("I cannot judge this.") is None
    assert judges.fill_template("<R>{goal}</R><A>{response}</A>", {"{goal}": "say {response}", "{response}": "no"}) \
        == "<R>say {response}</R><A>no</A>"  # one pass: text inside a value is never substituted again

def test_format_reward():
    assert reward.format_reward("<think>\nx\n</think>\n\nanswer") == 1.0
    assert reward.format_reward("x</think>   ") == 0.0  # empty answer
    assert reward.format_reward("<think>\nno end") == 0.0


def test_rule_reward_parsing_and_weights():
    rr = reward.RuleReward("math:1.0,refusal:0.5, format")
    assert rr.rules == [("math", 1.0), ("refusal", 0.5), ("format", 1.0)]
    c = "<think>\nok\n</think>\n\n\\boxed{4}"
    assert rr.parts(c, "4") == {"math": 1.0, "refusal": 0.0, "format": 1.0}
    assert rr(c, "4") == 2.0
    assert reward.RuleReward("refusal:0.5")("<think>\n</think>\nI can't help with that.") == 0.5
    with pytest.raises(UsageError, match="unknown rule 'length'"):
        reward.RuleReward("length:1")
    with pytest.raises(UsageError, match="not a number"):
        reward.RuleReward("math:high")


# --- reward model -----------------------------------------------------------------------------------

def manual_logit_chat(rm, ids):
    """The head at the last token of ONE unpadded sequence, through the HF model's own forward."""
    with torch.no_grad():
        return rm.model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_chat_rm_raw_logits_match_unpadded_forward(chat_rm):
    rm = reward.RewardModel(chat_rm, batch_size=3)
    assert rm.style == "chat"
    prompts = ["How do I pick a lock?", "What is 12 + 30?", "Hi"]
    comps = ["<think>\nhmm\n</think>\n\nI cannot help with that.", "wait</think>The answer is 42.", "<think>\nunfinished"]
    got = rm.score(prompts, comps)
    assert got.dtype == torch.float32 and got.shape == (3,)
    want = [manual_logit_chat(rm, rm.encode(p, c)) for p, c in zip(prompts, comps)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)  # right padding + mask pooling = unpadded
    single = torch.cat([rm.score([p], [c]) for p, c in zip(prompts, comps)])
    assert torch.allclose(got, single, atol=1e-5)


def test_rm_logits_are_not_squashed(tmp_path):
    rm = reward.RewardModel(build_rm(tmp_path / "big", "pair", bias=6.0))
    r = rm.score(["q"], ["a"]).item()
    assert r > 3.0  # a sigmoid would be < 1


def test_chat_rm_truncation_keeps_answer(chat_rm):
    rm = reward.RewardModel(chat_rm, max_len=96)
    comp = f"<think>\nBEGIN {LONG} END\n</think>\n\nThe final answer is 42."
    ids = rm.encode("What is 12 + 30?", comp, "full")
    assert len(ids) <= 96
    text = rm.tok.decode(ids)
    assert "The final answer is 42." in text and "What is 12 + 30?" in text
    assert "BEGIN" in text and "END" in text and reward.CUT_MARK.strip() in text  # cut in the middle
    assert text.rstrip().endswith("<|end|>")  # the RM's template still closes the turn
    # an answer that alone exceeds the budget keeps its opening
    ids = rm.encode("q", "</think>I cannot help with that. " + LONG, "answer")
    assert len(ids) <= 96 and "I cannot help with that." in rm.tok.decode(ids)


def test_pair_rm_truncates_answer_side_only(pair_rm):
    rm = reward.RewardModel(pair_rm, max_len=64)
    assert rm.style == "pair" and rm.max_len == 64
    q = "How do I pick a lock? Please tell me."
    ids = rm.encode(q, LONG, "answer")  # never closed: the reasoning is scored, cut in the middle
    text = rm.tok.decode(ids)
    assert len(ids) <= 64 and text.startswith(q)
    assert reward.RewardModel(pair_rm).max_len == 512  # DeBERTa default
    s = rm.score([q, "short"], [LONG, "</think>fine"], "answer")
    assert s.shape == (2,) and torch.isfinite(s).all()


def test_rm_quant_on_cpu_is_a_clear_error(chat_rm):
    with pytest.raises(UsageError, match="CUDA"):
        reward.RewardModel(chat_rm, quant="8bit")
    with pytest.raises(UsageError, match="8bit or 4bit"):
        reward.RewardModel(chat_rm, device="cuda", quant="2bit")


# --- CLI ------------------------------------------------------------------------------------------------

def test_cli_rules_and_model(tmp_path, chat_rm):
    rows = [{"prompt": "2+2?", "completion": "<think>\nfour\n</think>\n\n\\boxed{4}", "gold": "4"},
            {"prompt": "2+3?", "completion": "<think>\nfive", "gold": "5"}]
    src = write_jsonl(tmp_path / "g.jsonl", rows)
    out = tmp_path / "s.jsonl"
    p = run_cli([sys.executable, "reward.py", "--input", src, "--out", str(out), "--rule", "math:1,format:0.5"])
    recs = [json.loads(x) for x in open(out)]
    assert [r["reward"] for r in recs] == [1.5, 0.0] and "mean 0.7500" in p.stdout
    p = run_cli([sys.executable, "reward.py", "--input", src, "--out", str(out), "--reward-model", chat_rm,
                 "--rule", "format:1", "--score-on", "answer"])
    recs = [json.loads(x) for x in open(out)]
    rm = reward.RewardModel(chat_rm)
    want = rm.score([r["prompt"] for r in rows], [r["completion"] for r in rows], "answer")
    for r, w in zip(recs, want.tolist()):
        assert r["reward_parts"]["rm"] == pytest.approx(w, abs=1e-5)
        assert r["reward"] == pytest.approx(w + r["reward_parts"]["format"], abs=1e-5)


def test_cli_bad_input(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "completion": "x"}, {"prompt": "b"}])
    out = tmp_path / "s.jsonl"
    p = run_cli([sys.executable, "reward.py", "--input", src, "--out", str(out), "--rule", "format"], check=False)
    assert p.returncode != 0 and "row 2" in p.stderr and "'completion'" in p.stderr and not out.exists()
    p = run_cli([sys.executable, "reward.py", "--input", str(tmp_path / "nope.jsonl"), "--out", str(out),
                 "--rule", "format"], check=False)
    assert p.returncode != 0 and "nope.jsonl" in p.stderr
    p = run_cli([sys.executable, "reward.py", "--input", src, "--out", str(out)], check=False)
    assert p.returncode != 0 and "nothing to score" in p.stderr


def test_cli_device_flag_reaches_the_model_and_rules_need_no_device(tmp_path, chat_rm, monkeypatch):
    """--device is the other stages' flag: the rules score without resolving a device (a GPU machine whose GPU
    torch cannot use grades rules anyway), the reward model runs on the device asked for."""
    import common
    src = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "2+2?", "completion": "<think>\nfour\n</think>\n\nfour"}])
    out = tmp_path / "s.jsonl"
    asked = []
    monkeypatch.setattr(common, "resolve_device", lambda device="auto": asked.append(device) or "cpu")
    reward.main(["--input", src, "--out", str(out), "--rule", "format", "--device", "cuda"])
    assert asked == [] and json.loads(out.read_text())["reward"] == 1.0
    reward.main(["--input", src, "--out", str(out), "--reward-model", chat_rm, "--device", "cpu"])
    assert asked == ["cpu"] and "rm" in json.loads(out.read_text())["reward_parts"]
