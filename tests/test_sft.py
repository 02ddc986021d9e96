"""sft.py and the common.py plumbing it stands on: rendering, packing, loss invariances, resume, export."""
import json
import math
import os
import sys

import pytest
import torch

from conftest import SFT_ROWS, SHARED_DATA, run_cli, torchrun, write_jsonl

import common
import errors
import sft
import tables


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_render_keeps_reasoning_with_r1_template(tiny_model):
    tok = common.load_tokenizer(tiny_model)
    prompt, response = SFT_ROWS[0]["question"], SFT_ROWS[0]["response"]
    # The trap: rendering the pair as a conversation drops the reasoning from the target.
    conv = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False)
    assert "Wait, this may be harmful" not in conv
    ids, mask = common.render_sft(tok, prompt, response)
    target = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "Wait, this may be harmful" in target and "</think>" in target
    assert target.endswith("<|end|>")  # the end-of-turn token is trained on
    assert target.count("<think>") == 0  # the generation prompt already opened it: no duplicate
    prompt_text = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert prompt_text == common.render_prompt_text(tok, prompt)
    assert common.end_of_turn(tok) == "<|end|>"


def test_render_truncates_on_the_left(tiny_model):
    # the STAR-1 recipe keeps the LAST max_len tokens: the answer and the end-of-turn stay in the target
    tok = common.load_tokenizer(tiny_model)
    prompt, response = SFT_ROWS[0]["question"], SFT_ROWS[0]["response"]
    ids, mask = common.render_sft(tok, prompt, response)
    n_resp = sum(mask)
    for L in (len(ids) - 3, n_resp, n_resp - 5):                  # cut into the prompt, all of it, the response
        cut, cut_mask = common.render_sft(tok, prompt, response, max_len=L)
        assert cut == ids[-L:] and cut_mask == mask[-L:] and len(cut) == L
        assert tok.decode(cut).endswith("but here is a safe alternative.<|end|>")
    assert common.render_sft(tok, prompt, response, max_len=n_resp)[1] == [True] * n_resp


def test_packed_loss_equals_unpacked(tiny_model):
    tok = common.load_tokenizer(tiny_model)
    model = common.Policy(common.load_model(tiny_model))
    samples = [common.render_sft(tok, r["question"], r["response"]) for r in SFT_ROWS[:5]]

    def loss(rows):
        ids, pos, tgt, lmask = sft.collate(rows, tok.pad_token_id, "cpu")
        logp, _ = model(ids, position_ids=pos, targets=tgt)
        return -(logp * lmask).sum(), lmask.sum(), ids.shape

    packed, n1, shape1 = loss(sft.pack(samples, 4096))
    unpacked, n2, shape2 = loss(sft.pack(samples, 4096, packed=False))
    assert shape1[0] == 1 and shape2[0] == 5  # really packed into one row
    assert n1 == n2
    assert torch.allclose(packed, unpacked, rtol=1e-5), (packed, unpacked)


def test_pack_respects_max_len():
    samples = [([1] * n, [True] * n) for n in (5, 3, 4, 2, 6)]
    rows = sft.pack(samples, 8)
    assert all(sum(len(s[0]) for s in r) <= 8 for r in rows)
    assert sorted(len(s[0]) for r in rows for s in r) == [2, 3, 4, 5, 6]


def sft_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", str(out), "--batch-size", "4", "--epochs", "2",
            "--lr", "1e-3", "--seed", "3", *extra]


def test_loss_invariant_to_micro_batch_and_world_size(tiny_model, sft_rows, tmp_path):
    sft.main(sft_args(tiny_model, sft_rows, tmp_path / "mb4", "--micro-batch-size", "4", "--max-steps", "3"))
    sft.main(sft_args(tiny_model, sft_rows, tmp_path / "mb1", "--micro-batch-size", "1", "--max-steps", "3"))
    run_cli(torchrun(2) + ["sft.py"] + sft_args(tiny_model, sft_rows, tmp_path / "w2", "--micro-batch-size", "1",
                                                "--max-steps", "3"))
    a, b, c = metrics(tmp_path / "mb4"), metrics(tmp_path / "mb1"), metrics(tmp_path / "w2")
    assert [m["step"] for m in a] == [1, 2, 3]
    for x, y, z in zip(a, b, c):
        for key in ("loss", "grad_norm", "entropy"):
            assert abs(x[key] - y[key]) < 1e-5 * abs(x[key]), (key, x, y)
            assert abs(x[key] - z[key]) < 1e-5 * abs(x[key]), (key, x, z)
    # the 2-process run wrote a loadable Hugging Face dir with the same weights as 1 process
    w1 = common.load_model(str(tmp_path / "mb4")).state_dict()
    w2 = common.load_model(str(tmp_path / "w2")).state_dict()
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-6), k
    assert os.path.exists(tmp_path / "w2" / "args.json")


def test_resume_reproduces_uninterrupted_run(tiny_model, sft_rows, tmp_path):
    # 12 rows, batch 4: 3 steps an epoch; --max-steps 5 overrides --epochs 1 (as Hugging Face's Trainer):
    # 5 steps into a second epoch, the cosine spanning 5 steps (warmup 1): lr × [1, 1, (1+cos π/4)/2, 1/2, (1+cos 3π/4)/2]
    five = ["--epochs", "1", "--max-steps", "5"]
    full = sft.main(sft_args(tiny_model, sft_rows, tmp_path / "full", *five))
    lrs = [1e-3 * f for f in (1, 1, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2)]
    assert [m["lr"] for m in metrics(tmp_path / "full")] == pytest.approx(lrs, rel=1e-9)
    sft.main(sft_args(tiny_model, sft_rows, tmp_path / "part", *five, "--stop-at", "2"))
    assert [m["step"] for m in metrics(tmp_path / "part")] == [1, 2]
    resumed = sft.main(sft_args(tiny_model, sft_rows, tmp_path / "part", *five, "--resume"))
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"] and x["grad_norm"] == y["grad_norm"], (x, y)
    for (k, p), (_, q) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), k


def test_export_loads_and_matches_trained_model(tiny_model, sft_rows, tmp_path):
    from transformers import AutoModelForCausalLM
    policy = sft.main(sft_args(tiny_model, sft_rows, tmp_path / "o", "--max-steps", "2"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    ids = torch.randint(0, loaded.config.vocab_size, (2, 17))
    with torch.no_grad():
        assert torch.allclose(policy.hf(ids).logits, loaded(ids).logits, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, loaded(ids).logits, atol=1e-4)  # it did train
    assert common.load_tokenizer(str(tmp_path / "o")).chat_template  # tokenizer travels with the weights
    args = json.load(open(tmp_path / "o" / "args.json"))
    assert args["max_steps"] == 2 and args["lr"] == 1e-3


@pytest.mark.parametrize("bad, message", [
    ('{"question": "q", "response": "r"}\n{"question": "q2", "response": \n', "row 2: invalid JSON"),
    ('{"question": "q", "response": "r"}\n{"question": "q2"}\n', "row 2: missing field 'response'"),
    ('{"question": "q", "response": "r"}\n{"question": "q", "response": "r"}\n{"question": "q3", "response": " "}\n',
     "row 3: field 'response' is empty"),
])
def test_bad_rows_stop_with_file_row_field(tiny_model, tmp_path, bad, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(bad)
    with pytest.raises(errors.DataError, match=message):
        sft.main(sft_args(tiny_model, str(data), tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written
    p = run_cli([sys.executable, "sft.py"] + sft_args(tiny_model, str(data), tmp_path / "out"), check=False)
    assert p.returncode != 0 and str(data) in p.stderr and message in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_missing_model_path_is_a_clear_error(sft_rows, tmp_path):
    p = run_cli([sys.executable, "sft.py", "--model", str(tmp_path / "nope"), "--data", sft_rows,
                 "--out", str(tmp_path / "o")], check=False)
    assert p.returncode != 0 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_cli_smoke_single_process(tiny_model, sft_rows, tmp_path):
    run_cli([sys.executable, "sft.py"] + sft_args(tiny_model, sft_rows, tmp_path / "o", "--max-steps", "2",
                                                   "--micro-batch-size", "2", "--no-pack"))
    assert [m["step"] for m in metrics(tmp_path / "o")] == [1, 2]
    assert (tmp_path / "o" / "model.safetensors").exists() and (tmp_path / "o" / "state").is_dir()


def test_decontaminate_drops_overlapping_prompts(tmp_path):
    evalf = write_jsonl(tmp_path / "eval.jsonl", [{"problem": " ".join(f"w{i}" for i in range(20)), "answer": "1"}])
    rows = [{"prompt": " ".join(f"w{i}" for i in range(3, 18)) + " extra", "id": "a"},
            {"prompt": "completely different words here", "id": "b"}]
    keep, dropped = sft.decontaminate(rows, evalf)
    assert [r["id"] for r in keep] == ["b"] and dropped == ["a"]


def test_real_star1_renders(tiny_model):
    path = SHARED_DATA / "star1.json"
    if not path.exists():
        pytest.skip("../shared/data/star1.json not present")
    rows = tables.load_pairs(str(path))
    assert len(rows) == 1000
    tok = common.load_tokenizer(tiny_model)
    for r in rows[:5]:
        ids, mask = common.render_sft(tok, r["prompt"], r["response"])
        target = tok.decode([i for i, m in zip(ids, mask) if m])
        reasoning, answer, closed = common.split_reasoning(r["response"])
        assert closed and reasoning[:50] in target and answer[-50:] in target
    # 24 STAR-1 rows are verbatim AttaQ prompts: decontamination finds them
    attaq = SHARED_DATA / "attaq.csv"
    if attaq.exists():
        _, dropped = sft.decontaminate(rows, str(attaq))
        assert len(dropped) >= 24
