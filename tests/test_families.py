"""The paper's model families end to end, on tiny random configs (no hub): DeepSeek-R1-Distill's two
architectures (Qwen2 for 1.5B/7B/14B/32B, Llama for 8B/70B), Qwen3, and Granite-4.0-Tiny's
GraniteMoeHybrid (Mamba-2 layers + an attention layer, a mixture of experts, logits_scaling and the
embedding / residual / attention multipliers); plus the paper's reward model kind, a Llama sequence
classifier. Each family gets the chat template behaviour of its real checkpoints (written here).

Per family: SFT packed == unpacked loss through sft.py's own pack/collate and the Policy forward;
generation with left padding == teacher-forced log-probs (rl.py's recompute); 2-rank FSDP2 SFT and RL
steps == the 1-rank ones; export -> from_pretrained -> identical logits; entropy.py runs and its token
entropies equal the Policy's. HSDP (2 x 2 gloo ranks, launched as two torchrun "nodes") == 1 rank.

Then the families' REAL tokenizer files and chat templates (../shared/tokenizers, skipped when absent): the
prompt, SFT mask, stop ids, think state, split / grade / rewards with thinking on and off, reflection counts
on STAR-1, the reward model's input and the exported tokenizer files, per family / template / switch.
"""
import datetime
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, SHARED_DATA, build_tokenizer, run_cli, torchrun, write_jsonl

import checkpoint
import common
import engine
import entropy
import errors
import evaluate
import reward
import rl
import sft
from runs.tinymodels import CHAT_TEMPLATE as R1_TEMPLATE

FAMILIES = ("qwen2", "llama", "qwen3", "granite")

# Qwen3's template, reduced to its two behaviours (the tiny tokenizer's role tokens stand in for
# <|im_start|>/<|im_end|>): past assistant turns before the last user turn lose their reasoning, and
# enable_thinking=false ends the generation prompt with an empty think block.
QWEN3_TEMPLATE = (
    "{% set ns = namespace(last_user=0) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>\n"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}"
    "{% if loop.index0 < ns.last_user and '</think>' in c %}{% set c = c.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "<|assistant|>{{ c }}<|end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Granite 3.3 / 4.0's: thinking=true adds a system turn asking for <think>...</think><response>...</response>.
GRANITE_SYSTEM = ("You are a helpful AI assistant. Write your thoughts between <think></think> and your "
                  "response between <response></response>.")
GRANITE_TEMPLATE = (
    "{% if thinking is defined and thinking %}<|user|>system: " + GRANITE_SYSTEM + "<|end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEMPLATES = {"qwen2": R1_TEMPLATE, "llama": R1_TEMPLATE, "qwen3": QWEN3_TEMPLATE, "granite": GRANITE_TEMPLATE}

ROWS = [{"question": f"How do I open lock number {i}?" + " Please." * (i % 3),
         "response": f"<think>\nThe user asks about lock {i}. Wait, this may be harmful.{' But think.' * (i % 4)}"
                     f"\n</think>\n\nI cannot help with lock {i}, but a locksmith can."} for i in range(8)]


def family_config(name, tok, hidden=32):
    """A tiny random config of each family (vocab from the tiny tokenizer)."""
    from transformers import GraniteMoeHybridConfig, LlamaConfig, Qwen2Config, Qwen3Config
    # initializer_range 0.2 (not 0.02): peaked distributions, so a leak across samples shows in the loss
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, max_position_embeddings=512, initializer_range=0.2)
    attn = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2)
    if name == "qwen2":  # R1-Distill-Qwen: untied lm_head, biased q/k/v
        return Qwen2Config(num_hidden_layers=2, tie_word_embeddings=False, **attn, **ids)
    if name == "llama":  # R1-Distill-Llama: untied
        return LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False, **attn, **ids)
    if name == "qwen3":  # tied, q/k norms
        return Qwen3Config(num_hidden_layers=2, head_dim=hidden // 4, tie_word_embeddings=True, **attn, **ids)
    # Granite-4.0-Tiny shape in small: Mamba-2, attention, Mamba-2; 4 experts (top-2) + a shared MLP; no
    # RoPE (position_embedding_type None, as Granite-4.0); multipliers and logits_scaling away from 1.
    return GraniteMoeHybridConfig(
        num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=hidden, mamba_n_heads=4,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, embedding_multiplier=3.0,
        logits_scaling=2.5, residual_multiplier=0.5, attention_multiplier=1.0 / 8, tie_word_embeddings=True,
        **attn, **ids)


def build_family(out_dir, name, tok, seed=0):
    from transformers import AutoModelForCausalLM, GenerationConfig
    tok.chat_template = TEMPLATES[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, tok))
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id],
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """{family: Hugging Face dir} of tiny random models sharing one BPE tokenizer."""
    root = tmp_path_factory.mktemp("families")
    tok = build_tokenizer(root / "tok")
    return {name: build_family(root / name, name, tok) for name in FAMILIES}


def generate(model, prompts, *, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_p=1.0, seed=0):
    """The generation path rl.py uses: engine.generate (the direct static-cache decoder for Qwen2, Llama and
    Qwen3; the model's own forward and cache, left-padded, for GraniteMoeHybrid)."""
    return engine.generate(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                           temperature=temperature, top_p=top_p, seed=seed)


def load(path):
    return common.load_tokenizer(path), common.Policy(common.load_model(path)).eval()


# ------------------------------------------------------------------------------------------------ packing

def per_sample_logp(policy, samples, pad_id, packed):
    """sft.py's pack + collate + Policy forward -> (mean loss, rows, the log-probs of each sample's
    target tokens in input order)."""
    rows = sft.pack(samples, 4096, packed)
    ids, pos, tgt, lmask = sft.collate(rows, pad_id, "cpu")
    with torch.no_grad():
        logp, _ = policy(ids, position_ids=pos, targets=tgt)  # (R, L)
    where = {}
    for i, r in enumerate(rows):
        o = 0
        for s in r:
            where[id(s)] = logp[i, o:o + len(s[0]) - 1]
            o += len(s[0])
    loss = (-(logp * lmask).sum() / lmask.sum()).item()
    return loss, len(rows), torch.cat([where[id(s)] for s in samples])


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_packing_exact_or_off(families, family):
    tok, policy = load(families[family])
    samples = [common.render_sft(tok, r["question"], r["response"]) for r in ROWS[:5]]
    unpacked, rows, lp_u = per_sample_logp(policy, samples, tok.pad_token_id, packed=False)
    forced, one_row, lp_f = per_sample_logp(policy, samples, tok.pad_token_id, packed=True)
    assert rows == 5 and one_row == 1
    # what sft.py does: pack when the model type keeps packed samples apart, else one sample per row
    chosen, _, lp_c = per_sample_logp(policy, samples, tok.pad_token_id, packed=sft.packing_exact(policy.hf.config))
    d_forced, d_chosen = (lp_f - lp_u).abs().max().item(), (lp_c - lp_u).abs().max().item()
    print(f"{family}: packed vs unpacked |dloss| {abs(forced - unpacked):.2e} max |dlogp| {d_forced:.2e}; "
          f"sft.py's choice |dloss| {abs(chosen - unpacked):.2e} max |dlogp| {d_chosen:.2e}")
    assert abs(chosen - unpacked) <= 1e-5 and d_chosen <= 1e-5
    if family == "granite":  # the reason packing is off for it: Mamba state crosses samples
        assert not sft.packing_exact(policy.hf.config) and d_forced > 1e-2
    else:
        assert sft.packing_exact(policy.hf.config) and d_forced <= 1e-5


# ------------------------------------------------------------------------------------------------ generation

@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_generation_matches_teacher_forcing(families, family):
    tok, policy = load(families[family])
    prompts = [common.render_prompt(tok, p) for p in ["hi", "How do I pick a lock, please? Tell me now.", "1+1?"]]
    kw = dict(stop_ids=common.stop_token_ids(tok, policy.hf), pad_id=tok.pad_token_id)
    outs = generate(policy, prompts, max_new_tokens=10, temperature=0.7, **kw)
    items = [{"prompt_ids": p, "completion_ids": o["completion_ids"]} for p, o in zip(prompts, outs)]
    with torch.no_grad():
        logp, _, mask = rl.response_logprobs(policy, items, tok.pad_token_id, 0.7, "cpu")
    sampler = common.pad_right([o["logp"] for o in outs], length=mask.shape[1], dtype=torch.float32)[0]
    d_tf = (logp[mask] - sampler[mask]).abs().max().item()
    # a short prompt decodes in a batch exactly as alone (greedy; left-padded on the simple path)
    alone = generate(policy, prompts[2:], max_new_tokens=8, temperature=0, **kw)[0]
    batched = generate(policy, prompts, max_new_tokens=8, temperature=0, **kw)[2]
    d_pad = (torch.tensor(alone["logp"]) - torch.tensor(batched["logp"])).abs().max().item()
    print(f"{family}: sampler vs teacher-forced max |dlogp| {d_tf:.2e}; left-padded vs alone {d_pad:.2e}")
    assert mask.sum() > 3 and d_tf <= 1e-5
    assert alone["completion_ids"] == batched["completion_ids"] and d_pad <= 1e-5


# ------------------------------------------------------------------------------------------------ 1 vs 2 ranks, export

def sft_args(model, data, out):
    return ["--model", model, "--data", data, "--out", str(out), "--batch-size", "4", "--micro-batch-size", "1",
            "--max-steps", "2", "--lr", "1e-3", "--seed", "3", "--max-len", "256"]


def rl_args(model, prompts, out, rm):
    # --top-p 1e-6 keeps only the most likely token: the rollouts do not depend on the per-rank sampling
    # seed, so 1 and 2 ranks see the same samples and must take the same steps; one optimizer step per
    # rollout (--train-batch = all samples): the split into several would depend on the world size. A small
    # lr: at ratio 1 the whitened advantages nearly cancel, and Adam's first step (~ lr * sign(g)) turns
    # fp32 summation-order noise in near-zero gradient entries into weight differences ~ lr
    return ["--model", model, "--prompts", prompts, "--out", str(out), "--reward-model", rm, "--rollout-batch", "4",
            "--samples-per-prompt", "2", "--train-batch", "8", "--micro-batch-size", "1", "--max-new-tokens", "6",
            "--top-p", "1e-6", "--max-steps", "2", "--lr", "1e-4", "--kl-coef", "0.01", "--save-every", "1000",
            "--dump-every", "0", "--seed", "1"]


def build_rm(out_dir, tok, seed=0):
    """A tiny random LlamaForSequenceClassification (num_labels=1): Skywork-Reward-V2-Llama-3.1's kind."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig
    tok.chat_template = TEMPLATES["qwen3"]  # a template that keeps the reasoning of the assistant turn
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=512)
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="session")
def runs(families, tmp_path_factory):
    """Every family's SFT and RL run on 1 rank (in this process) and on 2 ranks (ONE torchrun that loops
    over the families: the start-up is paid once). Returns {(family, stage, world): (out dir, policy)}."""
    root = tmp_path_factory.mktemp("family_runs")
    data = write_jsonl(root / "rows.jsonl", ROWS)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": r["question"]} for r in ROWS])
    rm = build_rm(root / "rm", common.load_tokenizer(families["qwen3"]))
    jobs = []
    for f in FAMILIES:
        jobs.append((f, "sft", sft_args(families[f], data, root / f / "sft")))
        jobs.append((f, "rl", rl_args(families[f], prompts, root / f / "rl", rm)))
    spec = root / "jobs.json"
    spec.write_text(json.dumps([[stage, args[:5] + [args[5] + "-w2"] + args[6:]] for _, stage, args in jobs]))
    run_cli(torchrun(2) + ["tests/dist/family_check.py", str(spec)])
    out = {}
    import kernels.logprobs  # a session fixture runs before the autouse one: the CPU reference path, by hand
    interpret, kernels.logprobs.INTERPRET = kernels.logprobs.INTERPRET, False
    try:
        for f, stage, args in jobs:
            out[f, stage, 1] = (args[5], (sft if stage == "sft" else rl).main(args))
            out[f, stage, 2] = (args[5] + "-w2", None)
    finally:
        kernels.logprobs.INTERPRET = interpret
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_equal_one_and_export_roundtrips(runs, family):
    from transformers import AutoModelForCausalLM
    for stage, keys in (("sft", ("loss", "grad_norm", "entropy")), ("rl", ("reward", "kl", "loss", "grad_norm"))):
        (one, policy), (two, _) = runs[family, stage, 1], runs[family, stage, 2]
        a, b = metrics(one), metrics(two)
        assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
        for x, y in zip(a, b):
            for k in keys:
                assert abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])), (family, stage, k, x[k], y[k])
        if stage == "rl":
            assert a[0]["grad_norm"] > 0 and len({round(m["reward"], 6) for m in a}) >= 1
        w1, w2 = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (one, two))
        dw = max((w1[k] - w2[k]).abs().max().item() for k in w1)
        # export -> from_pretrained -> the trained model's logits, exactly
        loaded = AutoModelForCausalLM.from_pretrained(one).eval()
        ids = torch.randint(0, loaded.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            dz = (policy.hf.eval()(ids).logits - loaded(ids).logits).abs().max().item()
        print(f"{family} {stage}: max |metric diff| 1 vs 2 ranks "
              f"{max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in keys):.2e}, max |dw| {dw:.2e}, "
              f"export max |dlogits| {dz:.2e}")
        assert w1.keys() == w2.keys() and dw <= 1e-5 and dz == 0.0
        assert json.load(open(os.path.join(one, "args.json")))["model"]


# ------------------------------------------------------------------------------------------------ entropy.py

def test_entropy_runs_on_every_family(families, tmp_path, monkeypatch):
    recs = [{"prompt": r["question"], "completion": r["response"].removeprefix("<think>\n"), "temperature": 0.7}
            for r in ROWS[:3]]
    data = write_jsonl(tmp_path / "gens.jsonl", recs)
    argv = ["entropy.py", "--input", f"gens={data}", "--out", str(tmp_path / "ent"), "--bootstrap", "10"]
    argv += [a for f in FAMILIES for a in ("--model", f"{f}={families[f]}")]
    monkeypatch.setattr(sys, "argv", argv)
    entropy.main()
    summary = json.load(open(tmp_path / "ent" / "summary.json"))
    assert sorted(s["model"] for s in summary) == sorted(FAMILIES)
    for f in FAMILIES:  # its token entropies are the Policy's (Granite: logits_scaling honoured)
        tok, policy = load(families[f])
        p, c = common.render_prompt(tok, recs[0]["prompt"]), tok.encode(recs[0]["completion"], add_special_tokens=False)
        _, ent, _ = entropy.token_stats(policy.hf, [p + c], [len(p)], 0.7, pad_id=tok.pad_token_id)[0]
        with torch.no_grad():
            _, ref, mask = rl.response_logprobs(policy, [{"prompt_ids": p, "completion_ids": c}], tok.pad_token_id,
                                                0.7, "cpu")
        d = (ent - ref[mask]).abs().max().item()
        print(f"{f}: entropy.py vs Policy max |dH| {d:.2e}")
        assert d <= 1e-5


def test_records_keep_prompt_ids_and_thinking_and_entropy_scores_on_them(families, tmp_path):
    """evaluate.py with Qwen3's thinking off: each record holds the token ids it was generated from and
    thinking false (answer-only: think_closed true); entropy.py, run WITHOUT the template variables,
    teacher-forces on those ids, not on a prompt rendered again with thinking on."""
    model, kw = families["qwen3"], {"enable_thinking": False}
    maths = write_jsonl(tmp_path / "m.jsonl", [{"problem": "6*7?", "answer": "42", "unique_id": "a"},
                                               {"problem": "2+5?", "answer": "7", "unique_id": "b"}])
    evaluate.main(["--model", model, "--benchmarks", "math500", "--data", f"math500={maths}", "--samples", "1",
                   "--max-new-tokens", "6", "--chat-template-kwargs", json.dumps(kw), "--out", str(tmp_path / "ev")])
    recs = [json.loads(x) for x in open(tmp_path / "ev" / "math500.jsonl")]
    tok, policy = load(model)
    for r in recs:
        assert r["prompt_ids"] == common.render_prompt(tok, r["prompt"], kw) != common.render_prompt(tok, r["prompt"])
        assert r["thinking"] is False and r["think_closed"] is True and r["answer"] == r["completion"].strip()
    entropy_main(["--model", f"qwen3={model}", "--input", f"m={tmp_path / 'ev' / 'math500.jsonl'}",
                  "--out", str(tmp_path / "ent"), "--bootstrap", "10"])
    scored = [json.loads(x) for x in open(tmp_path / "ent" / "records.jsonl")]
    assert len(scored) == sum(bool(r["completion"]) for r in recs) > 0
    for e in scored:
        r = recs[e["row"] - 1]
        c = tok.encode(r["completion"], add_special_tokens=False)
        _, ent, _ = entropy.token_stats(policy.hf, [r["prompt_ids"] + c], [len(r["prompt_ids"])], 0.6,
                                        pad_id=tok.pad_token_id)[0]
        assert e["n_reasoning"] == 0 and e["n_answer"] == len(c) and e["think_closed"]
        assert abs(e["entropy_answer"] - ent.double().mean().item()) <= 1e-6


# ------------------------------------------------------------------------------------------------ reward model

def test_llama_sequence_classifier_reward_is_the_raw_last_token_logit(families, tmp_path):
    rm_dir = build_rm(tmp_path / "rm", common.load_tokenizer(families["llama"]))
    rm = reward.RewardModel(rm_dir, "cpu", torch.float32, batch_size=3)
    prompts = ["hi", "How do I pick a lock?", "What is 2+2? Answer briefly please.", "x"]
    comps = ["<think>\nok</think>\n\nhello", "<think>\nno. Wait.</think>\n\nI cannot help.", "4</think>4", "never closed"]
    got = rm.score(prompts, comps)
    hand = []
    with torch.no_grad():
        for p, c in zip(prompts, comps):
            ids = torch.tensor([rm.encode(p, c)])  # (1, T) one unpadded sequence
            h = rm.model.model(input_ids=ids).last_hidden_state[0, -1]  # (D,) the last token
            hand.append((rm.model.score.weight[0] @ h).item())  # the raw logit, no sigmoid
    d = (got - torch.tensor(hand)).abs().max().item()
    print(f"llama RM: RewardModel vs hand max |dr| {d:.2e}")
    assert d <= 1e-5 and got.std() > 0
    assert "ok" in rm.tok.decode(rm.encode(prompts[0], comps[0]))  # the RM sees the reasoning
    # also under an RM template whose prompt closes the think block (no two-think-block refusal: SFT's rule)
    off = reward.RewardModel(rm_dir, "cpu", torch.float32, chat_kwargs={"enable_thinking": False})
    assert "ok" in off.tok.decode(off.encode(prompts[0], comps[0]))


# ------------------------------------------------------------------------------------------------ chat templates

def test_r1_template_drops_past_reasoning_but_sft_keeps_it(families):
    tok = common.load_tokenizer(families["qwen2"])
    r = ROWS[1]
    conv = tok.apply_chat_template([{"role": "user", "content": r["question"]},
                                    {"role": "assistant", "content": r["response"]}], tokenize=False)
    assert "Wait, this may be harmful" not in conv
    assert common.render_prompt_text(tok, r["question"]).endswith("<think>\n")
    ids, mask = common.render_sft(tok, r["question"], r["response"])
    target = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "Wait, this may be harmful" in target and target.count("<think>") == 0
    # the model writes only the closing tag: the split still finds both parts
    assert common.split_reasoning("The user asks. Wait.\n</think>\n\nNo.") == ("The user asks. Wait.", "No.", True)


def test_qwen3_enable_thinking_switch(families):
    tok = common.load_tokenizer(families["qwen3"])
    on = common.render_prompt_text(tok, "hi")
    off = common.render_prompt_text(tok, "hi", {"enable_thinking": False})
    assert on.endswith("<|assistant|>") and off == on + "<think>\n\n</think>\n\n"
    ids, mask = common.render_sft(tok, "hi", "Hello!", chat_kwargs={"enable_thinking": False})
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|end|>\n"
    assert common.end_of_turn(tok, {"enable_thinking": False}) == "<|end|>\n"
    # past turns before the last user turn lose their reasoning
    conv = tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r</think>A"},
                                    {"role": "user", "content": "b"}], tokenize=False)
    assert "<think>" not in conv and "A<|end|>" in conv
    assert common.split_reasoning("<think>\nr\n</think>\n\nA") == ("r", "A", True)


def test_granite_thinking_switch_and_formats(families):
    tok = common.load_tokenizer(families["granite"])
    assert GRANITE_SYSTEM not in common.render_prompt_text(tok, "hi")
    assert GRANITE_SYSTEM in common.render_prompt_text(tok, "hi", {"thinking": True})
    # Granite 3.3 / 4.0: <think>..</think><response>..</response>; Granite 3.2: the two "Here is my" markers
    assert common.split_reasoning("<think>Let me see. Wait.</think><response>I cannot help.</response>") == \
        ("Let me see. Wait.", "I cannot help.", True)
    text = "Here is my thought process:\nHarmful. But.\n\nHere is my response:\nNo."
    assert common.split_reasoning(text) == ("Harmful. But.", "No.", True)
    assert common.split_reasoning("Here is my thought process:\nstill thinking") == ("still thinking", "", False)
    # the marker only counts when the text opens with the thought marker
    assert common.split_reasoning("So, Here is my response: x") == ("So, Here is my response: x", "", False)
    # entropy.py puts tokens in the same segments
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    reasoning, answer = entropy.segment_masks(text, enc["offset_mapping"])
    pieces = lambda m: "".join(text[s:e] for (s, e), x in zip(enc["offset_mapping"], m) if x)
    assert "Harmful" in pieces(reasoning) and "response" not in pieces(reasoning) and pieces(answer).strip() == "No."


def test_chat_template_kwargs_flag_is_validated_and_recorded(families, tmp_path, capsys):
    m, d, o = families["qwen3"], str(tmp_path / "d.jsonl"), str(tmp_path / "o")
    parsers = {"sft.py": lambda a: sft.get_args(["--model", m, "--data", d, "--out", o] + a),
               "rl.py": lambda a: rl.get_args(["--model", m, "--prompts", d, "--out", o] + a),
               "evaluate.py": lambda a: evaluate.eval_parser().parse_args(["--model", m, "--out", o] + a)}
    for name, parse in parsers.items():
        for bad in ("{not json", "[1, 2]", '{"tokenize": true}'):
            with pytest.raises(SystemExit) as e:
                parse(["--chat-template-kwargs", bad])
            assert e.value.code == 2 and "--chat-template-kwargs" in capsys.readouterr().err, name
        assert parse(["--chat-template-kwargs", '{"enable_thinking": false}']).chat_template_kwargs == \
            {"enable_thinking": False}
    for main, flag in ((reward.main, "--reward-model"), (entropy_main, "--model")):
        with pytest.raises(SystemExit) as e:
            main(["--input", d, "--out", o, flag, m, "--chat-template-kwargs", "{"])
        assert e.value.code == 2 and "--chat-template-kwargs" in capsys.readouterr().err
    args = evaluate.eval_parser().parse_args(["--model", m, "--out", o, "--chat-template-kwargs", '{"enable_thinking": false}'])
    st = evaluate.settings(args, common.load_tokenizer(m), ["math500"], {}, {"math500": 1}, 1)
    assert st["chat_template_kwargs"] == {"enable_thinking": False}


def entropy_main(argv):
    old = sys.argv
    sys.argv = ["entropy.py"] + argv
    try:
        entropy.main()
    finally:
        sys.argv = old


# ------------------------------------------------------------------------------------------------ real tokenizers
# The real tokenizer files and chat templates of the paper's families (../shared/tokenizers, each folder with its
# PROVENANCE.txt; skipped when absent), paired where a model is needed with a tiny random config of the family's
# architecture and the tokenizer's vocabulary size.

SHARED_TOKENIZERS = ROOT.parent / "shared" / "tokenizers"
SOLVED, THOUGHT = "The answer is $\\boxed{42}$.", "Six sevens. Wait, 42."
REFUSED = "I'm sorry, but I can't help with that request."
# case -> (tokenizer, architecture, template variables, where its prompt leaves the think block, its stop ids)
REAL = {
    "r1qwen": ("r1qwen", "qwen2", {}, "open", [151643]),
    "r1qwen-first": ("r1qwen-first", "qwen2", {}, "none", [151643]),  # the first template: the model opens <think>
    "r1llama": ("r1llama", "llama", {}, "open", [128001]),
    "qwen3": ("qwen3", "qwen3", {}, "none", [151643, 151645]),
    "qwen3-off": ("qwen3", "qwen3", {"enable_thinking": False}, "closed", [151643, 151645]),
    "granite": ("granite33", "granite", {"thinking": True}, "none", [0]),
    "granite-off": ("granite33", "granite", {}, "none", [0]),
    "smollm2": ("smollm2", "llama", {}, "none", [2]),
}
TOKENIZERS = ("r1qwen", "r1llama", "qwen3", "granite33", "smollm2", "llama31")


@pytest.fixture(scope="session")
def real_dirs(tmp_path_factory):
    """{name: dir} of the real tokenizers; r1qwen-first: R1-Distill-Qwen with its first release's template."""
    if not SHARED_TOKENIZERS.is_dir():
        pytest.skip(f"the real tokenizers are not at {SHARED_TOKENIZERS}")
    dirs = {name: str(SHARED_TOKENIZERS / name) for name in TOKENIZERS}
    first = tmp_path_factory.mktemp("r1qwen-first")
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(SHARED_TOKENIZERS / "r1qwen" / name, first / name)
    shutil.copy(SHARED_TOKENIZERS / "r1qwen" / "tokenizer_config.old_template.json", first / "tokenizer_config.json")
    dirs["r1qwen-first"] = str(first)
    return dirs


@pytest.fixture(scope="session")
def real_toks(real_dirs):
    """Every real tokenizer through common.load_tokenizer: each passes its round-trip check on the pinned
    transformers (the README's version claim)."""
    return {name: common.load_tokenizer(d) for name, d in real_dirs.items()}


@pytest.fixture(scope="session")
def star1():
    path = SHARED_DATA / "star1.json"
    if not path.exists():
        pytest.skip(f"STAR-1 is not at {path}")
    return json.load(open(path))


def set_clock(monkeypatch, day):
    """transformers' strftime_now (the clock a chat template reads) on `day`."""
    import transformers.utils.chat_template_utils as ctu

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(day.year, day.month, day.day)
    monkeypatch.setattr(ctu, "datetime", Clock)


@pytest.mark.parametrize("case", REAL)
def test_real_prompt_is_the_template_s_own_on_a_fixed_date(real_toks, real_dirs, star1, case, monkeypatch):
    """common.render_prompt == apply_chat_template(tokenize=True) on common.TEMPLATE_DATE, whatever the day
    (Granite's default system turn writes the date); the prompt leaves the think block as the family does;
    the stop ids are the real ones."""
    from transformers import GenerationConfig
    name, _, kw, state, stops = REAL[case]
    tok, q = real_toks[name], star1[0]["question"]
    got = []
    for day in (datetime.date(2031, 7, 9), common.TEMPLATE_DATE):
        set_clock(monkeypatch, day)
        got.append(common.render_prompt(tok, q, kw))
    want = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True, **kw)
    assert got[0] == got[1] == list(want["input_ids"] if hasattr(want, "keys") else want)
    assert common.think_state(common.render_prompt_text(tok, q, kw)) == state
    gc = GenerationConfig.from_pretrained(real_dirs[name])
    assert common.stop_token_ids(tok, SimpleNamespace(generation_config=gc), kw) == stops


@pytest.mark.parametrize("case", REAL)
def test_real_sft_mask(real_toks, star1, case):
    """The loss mask covers exactly the response and the end-of-turn after the rendered prompt; with thinking
    off a response with reasoning is refused (two think blocks) or, asked for, trained on its answer alone."""
    name, _, kw, state, _ = REAL[case]
    tok, row = real_toks[name], star1[0]
    eot, response = common.end_of_turn(tok, kw), row["response"]
    if state == "closed":
        with pytest.raises(errors.UsageError, match="two think blocks"):
            common.render_sft(tok, row["question"], response, chat_kwargs=kw)
        ids, mask = common.render_sft(tok, row["question"], response, chat_kwargs=kw, reasoning_when_off="drop")
        want = common.split_reasoning(response)[1] + eot
    else:
        ids, mask = common.render_sft(tok, row["question"], response, chat_kwargs=kw)
        want = (response[len("<think>"):].lstrip("\n") if state == "open" else response) + eot
    n = mask.index(True)
    assert ids[:n] == common.render_prompt(tok, row["question"], kw) and all(mask[n:])
    assert tok.decode(ids[n:]) == want


def test_sft_refuses_reasoning_with_thinking_off_unless_answer_only(real_dirs, real_toks, star1, tmp_path):
    data = write_jsonl(tmp_path / "star1.jsonl", star1[:3])
    argv = ["--model", real_dirs["qwen3"], "--data", data, "--out", str(tmp_path / "o"),
            "--chat-template-kwargs", '{"enable_thinking": false}']
    with pytest.raises(errors.DataError, match=r"row 1: .*two think blocks.*--answer-only"):
        sft.load_examples(sft.get_args(argv), real_toks["qwen3"])
    examples = sft.load_examples(sft.get_args(argv + ["--answer-only"]), real_toks["qwen3"])
    tok = real_toks["qwen3"]
    assert [tok.decode([i for i, m in zip(ids, mask) if m]) for ids, mask in examples] == \
        [common.split_reasoning(r["response"])[1] + "<|im_end|>\n" for r in star1[:3]]


def family_completion(case, answer, closed=True):
    """What a model of `case` writes after its prompt: reasoning then `answer` in the family's format, or the
    answer alone where the prompt turns thinking off or the model has no thinking mode."""
    name, _, _, state, _ = REAL[case]
    end = "\n</think>\n\n" + answer if closed else ""
    if state == "open":  # the prompt opened the block: the model writes only the closing tag
        return THOUGHT + end
    if case in ("r1qwen-first", "qwen3"):
        return "<think>\n" + THOUGHT + end
    if case == "granite":
        return "<think>" + THOUGHT + (f"</think><response>{answer}</response>" if closed else "")
    return answer


@pytest.mark.parametrize("case", REAL)
def test_real_split_grade_and_reward_with_thinking_on_and_off(real_toks, case):
    """The record's `thinking` comes from the rendered prompt; with it, every family's completion splits,
    grades and earns its rule rewards: thinking off and plain instruct models included (answer-only: all
    answer, think_closed true), and unfinished thinking still scores 0."""
    name, _, kw, state, _ = REAL[case]
    thinking = common.prompt_thinking(common.render_prompt_text(real_toks[name], "What is 6*7?", kw))
    assert thinking == (state == "open")
    recs = [{"benchmark": "math500", "id": "q", "sample": 0, "prompt": "What is 6*7?", "gold": "42",
             "completion": family_completion(case, SOLVED), "thinking": thinking}]
    answer_only = recs[0]["completion"] == SOLVED
    if not answer_only:
        recs.append({**recs[0], "sample": 1, "completion": family_completion(case, SOLVED, closed=False)})
    evaluate.grade_records(recs)
    assert (recs[0]["answer"], recs[0]["think_closed"], recs[0]["score"]) == (SOLVED, True, 1.0)
    assert recs[0]["reasoning"] == ("" if answer_only else THOUGHT)
    if not answer_only:
        assert (recs[1]["answer"], recs[1]["think_closed"], recs[1]["score"]) == ("", False, 0.0)
    rules = reward.RuleReward("refusal,format")
    assert rules(family_completion(case, REFUSED), None, thinking) == 2.0
    assert rules(family_completion(case, SOLVED), None, thinking) == 1.0


@pytest.mark.parametrize("name", TOKENIZERS)
def test_real_reflection_words_are_whole_words_on_the_same_tokens_from_text_and_from_ids(real_toks, star1, name):
    """entropy.py's matching on re-tokenized text (score_record's offsets) and rl.py's per-step monitor on the
    sampled ids (entropy.reflection_mask) find exactly the whole-word reflection words of STAR-1's reasoning,
    on the same tokens, on every family's BPE (Granite's splits a line-initial "Alternatively" in two and has
    a "but" token inside "butt": token matching miscounts there)."""
    tok, words = real_toks[name], entropy.word_set(entropy.DEFAULT_WORDS)
    texts = [common.split_reasoning(r["response"])[0] for r in star1]
    want = [len(re.findall(r"\b(?:" + "|".join(sorted(words)) + r")\b", t)) for t in texts]
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    from_text = [[i for i, _, _ in entropy.find_reflections(t, off, [True] * len(off), words)]
                 for t, off in zip(texts, enc["offset_mapping"])]
    items = [{"completion_ids": ids, "thinking": True} for ids in enc["input_ids"]]
    hits = entropy.reflection_mask(items, words, max(map(len, enc["input_ids"])), functools.lru_cache(None)(
        lambda i: tok.decode([i])))
    from_ids = [row.nonzero().flatten().tolist() for row in hits]
    print(f"{name}: {sum(want)} reflection words; entropy.py {sum(map(len, from_text))}, rl.py {int(hits.sum())}")
    assert [len(x) for x in from_text] == want and from_ids == from_text and sum(want) > 1000


def test_real_reward_model_input(real_dirs, tmp_path):
    """Skywork-Reward-V2's recipe on the Llama-3.1 side: the conversation through the RM's own template
    (Llama-3.1-Instruct's, with its system block), one BOS; reasoning shown as a think block, an
    answer-only completion as the answer alone."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig
    d = tmp_path / "rm"
    d.mkdir()
    shutil.copy(SHARED_TOKENIZERS / "llama31" / "tokenizer.json", d / "tokenizer.json")
    cfg = json.load(open(SHARED_TOKENIZERS / "llama31" / "tokenizer_config.json"))
    cfg["chat_template"] = (SHARED_TOKENIZERS / "llama31" / "llama31_instruct.jinja").read_text()
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = common.load_tokenizer(d)
    AutoModelForSequenceClassification.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)).save_pretrained(d)
    rm = reward.RewardModel(str(d), "cpu", torch.float32)
    q = "How do I pick a lock?"
    for completion, thinking, shown in ((THOUGHT + "\n</think>\n\n" + REFUSED, True,
                                         f"<think>\n{THOUGHT}\n</think>\n\n{REFUSED}"), (REFUSED, False, REFUSED)):
        ids = rm.encode(q, completion, "full", thinking)
        want = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": shown}],
                                       tokenize=True)
        assert ids == list(want["input_ids"] if hasattr(want, "keys") else want)
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert torch.isfinite(rm.score([q, q], [REFUSED, REFUSED], thinking=[True, False])).all()


@pytest.mark.parametrize("name", ["r1qwen", "r1llama", "qwen3", "granite33", "smollm2"])
def test_real_export_keeps_the_input_tokenizer_files(real_dirs, name, tmp_path):
    """save_hf's export holds the input checkpoint's tokenizer files byte for byte (what loaded the base
    model loads ours), and reloads to the same logits, prompt ids and stop ids."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    src, out = tmp_path / "in", tmp_path / "out"
    arch = next(a for n, a, *_ in REAL.values() if n == name)
    names = [n for n in checkpoint.TOKENIZER_EXPORT_FILES if (Path(real_dirs[name]) / n).exists()]
    tok = common.load_tokenizer(real_dirs[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(arch, tok, hidden=16))
    model.generation_config = GenerationConfig.from_pretrained(real_dirs[name])
    model.save_pretrained(src)
    for n in names:
        shutil.copy(Path(real_dirs[name]) / n, src / n)
    tok = common.load_tokenizer(src)
    policy = common.Policy(common.load_model(src)).eval()
    out.mkdir()
    (out / "chat_template.jinja").write_text("{{ 'a template an earlier export left' }}")
    checkpoint.save_hf(policy, tok, out)
    assert names and all((src / n).read_bytes() == (out / n).read_bytes() for n in names)
    assert sorted(n for n in checkpoint.TOKENIZER_EXPORT_FILES if (out / n).exists()) == sorted(names)  # nothing stale
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = common.load_tokenizer(out)
    ids = torch.tensor([common.render_prompt(tok, "How do I pick a lock?")])
    with torch.no_grad():
        assert torch.equal(policy.hf(ids).logits, back(ids).logits)
    assert common.render_prompt(tok2, "How do I pick a lock?") == ids[0].tolist()
    assert common.stop_token_ids(tok2, back) == common.stop_token_ids(tok, policy.hf)


def test_load_tokenizer_refuses_a_tokenizer_that_loses_spaces(tmp_path, real_toks):
    """A tokenizer that drops spaces (what transformers 5.17 makes of DeepSeek-R1-Distill-Llama's: a Metaspace
    pre-tokenizer over a ByteLevel vocabulary) is refused at load, naming the version issue."""
    d = tmp_path / "tok"
    build_tokenizer(d)
    tj = json.load(open(d / "tokenizer.json"))
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(errors.UsageError, match=r"'a b c'\)\) = 'abc'.*transformers.*5\.17"):
        common.load_tokenizer(d)
    assert all(t.decode(t.encode("a b c", add_special_tokens=False)) == "a b c" for t in real_toks.values())


# ------------------------------------------------------------------------------------------------ HSDP

def test_hsdp_replicas():
    assert common.hsdp_replicas(None, 1) == 1 and common.hsdp_replicas(2, 4) == 2
    with pytest.raises(errors.UsageError, match="--replicate 3"):
        common.hsdp_replicas(3, 4)
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    try:
        assert common.hsdp_replicas(None, 4) == 2  # torchrun over 2 nodes x 2: one replica per node
    finally:
        del os.environ["LOCAL_WORLD_SIZE"]


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_hsdp_two_nodes_by_two_equals_one_rank(families, runs, tmp_path):
    """The README's two-node command on one machine: two torchrun agents (--nnodes 2, --node-rank 0/1,
    2 processes each) meet at one rendezvous endpoint; the mesh is chosen automatically (2 x 2). The
    gradients of one step equal the 1-rank ones, and sft.py on that mesh takes the 1-rank run's steps."""
    model, out = families["qwen3"], tmp_path / "hsdp.pt"
    one = runs["qwen3", "sft", 1][0]
    data = json.load(open(os.path.join(one, "args.json")))["data"]
    argv = sft_args(model, data, tmp_path / "sft-hsdp")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "hsdp-test"]
    procs = [subprocess.Popen(cmd + ["--node-rank", str(r), "tests/dist/hsdp_check.py", model, data, str(out),
                                     json.dumps(argv)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    assert "HSDP 2 x 2" in logs[0]
    got = torch.load(out)
    assert got["mesh"] == [2, 2]
    sys.path.insert(0, os.path.dirname(__file__))
    from dist import hsdp_check
    want = hsdp_check.loss_and_grads(common.Policy(common.load_model(model)), common.load_tokenizer(model),
                                          data, 0, 1)
    dl = abs(got["loss"] - want["loss"])
    dg = max((got["grads"][k] - want["grads"][k]).abs().max().item() for k in want["grads"])
    dn = abs(got["gnorm"] - want["gnorm"])
    a, b = metrics(one), metrics(tmp_path / "sft-hsdp")
    dm = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("loss", "grad_norm"))
    print(f"HSDP 2x2 vs 1 rank: |dloss| {dl:.2e}, max |dgrad| {dg:.2e}, |dgnorm| {dn:.2e}; sft.py 2 steps max "
          f"|dmetric| {dm:.2e}")
    assert got["grads"].keys() == want["grads"].keys()
    assert dl <= 1e-6 and dg <= 1e-6 and dn <= 1e-5
    assert len(a) == len(b) == 2 and dm <= 1e-5 * max(1.0, abs(a[0]["loss"]))
