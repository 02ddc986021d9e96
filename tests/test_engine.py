"""engine.py: greedy tokens equal model.generate for Qwen2, Llama and Qwen3; sampled log-probs equal a
teacher-forced forward; no id past the tokenizer is ever drawn, on either path; sampling is a pure
function of (seed, row, t) (batch size, refill, compaction, buckets and the path taken change nothing);
bucket and compaction edges; the simple path for hybrid models; 2 gloo ranks decode without a single
collective and match one rank. The sampler's own claims: tests/test_sampler.py."""
import json

import pytest
import torch

from conftest import run_cli, torchrun

import engine

V = 97


def tiny(family, seed=0, layers=2):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
    C = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}[family]
    cfg = C(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=family != "llama")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompts, new):
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        am[i, L - len(p):] = 1
    out = model.generate(ids, attention_mask=am, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[:, L:].tolist()


def teacher_forced(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        z = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature  # (T, V)
    return torch.log_softmax(z, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


GEN = dict(stop_ids=[], pad_id=0, len_bucket=8, check_every=4)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_greedy_equals_generate_left_padded(family):
    model = tiny(family)
    prompts = prompts_of([5, 9, 1, 13, 7])
    ref = hf_greedy(model, prompts, 21)
    outs = engine.generate(model, prompts, max_new_tokens=21, temperature=0, **GEN)
    assert engine.direct_support(model) is None
    assert [o["completion_ids"] for o in outs] == ref
    assert all(o["truncated"] and not o["finished"] for o in outs)
    simple = engine.generate(model, prompts, max_new_tokens=21, temperature=0, simple=True, **GEN)
    assert [o["completion_ids"] for o in simple] == ref


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_sampled_logp_equals_teacher_forced(family):
    model = tiny(family)
    prompts = prompts_of([4, 11, 6])
    for temperature, top_p in ((0.7, 0.9), (1.3, 1.0)):
        outs = engine.generate(model, prompts, max_new_tokens=17, temperature=temperature, top_p=top_p, seed=3, **GEN)
        for p, o in zip(prompts, outs):
            tf = teacher_forced(model, p, o["completion_ids"], temperature)
            assert torch.allclose(torch.tensor(o["logp"]), tf, atol=1e-5), (temperature, top_p)


def unused_rows_model():
    """Llama (untied head) whose 7 lm_head rows past id 90 are 3 x rows 0-6: likely tokens a tokenizer of
    90 ids could not decode."""
    model = tiny("llama")
    with torch.no_grad():
        model.lm_head.weight[90:] = 3 * model.lm_head.weight[:7]
    return model


def test_ids_past_the_tokenizer_are_never_sampled():
    model = unused_rows_model()
    prompts = [torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (4, 9, 6)]
    kw = dict(max_new_tokens=20, temperature=1.0, seed=2, **GEN)
    free = engine.generate(model, prompts, **kw)
    assert any(x >= 90 for o in free for x in o["completion_ids"])  # the model does put mass there
    for extra in (dict(), dict(simple=True), dict(top_p=0.9)):
        outs = engine.generate(model, prompts, vocab_size=90, **kw, **extra)
        assert all(x < 90 for o in outs for x in o["completion_ids"]), extra
        for p, o in zip(prompts, outs):  # logp is π_old's (all rows); log C = log of the mass below id 90 (and top-p)
            ids = torch.tensor([p + o["completion_ids"]])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0, len(p) - 1:-1].double(), -1)  # (T, V)
            y = torch.tensor(o["completion_ids"])
            assert torch.allclose(torch.tensor(o["logp"]).double(), lp[torch.arange(len(y)), y], atol=1e-5)
            C = lp[:, :90].exp().sum(-1)
            kept = torch.tensor(o["log_kept"]).double()
            assert (kept <= C.log() + 1e-6).all() and (kept < 0).all()
            if "top_p" not in extra:
                assert torch.allclose(kept, C.log(), atol=1e-5), extra
    greedy = engine.generate(model, prompts, vocab_size=90, **{**kw, "temperature": 0})
    assert all(x < 90 for o in greedy for x in o["completion_ids"])
    with pytest.raises(ValueError, match="vocab_size"):
        engine.generate(model, prompts, vocab_size=0, **kw)


def test_sampling_does_not_depend_on_batching_buckets_or_path():
    model = tiny("qwen3")
    prompts = prompts_of([3, 8, 5, 12, 2, 9, 6, 4, 10])
    kw = dict(max_new_tokens=30, stop_ids=[5, 17], pad_id=0, temperature=1.0, top_p=0.95, seed=11)
    ref = engine.generate(model, prompts, batch_size=16, **kw)
    assert any(o["finished"] for o in ref) and any(o["truncated"] for o in ref)
    assert ref == engine.generate(model, prompts, batch_size=16, **kw)  # same seed, same samples
    variants = [dict(batch_size=2, check_every=3, len_bucket=4),  # refill into freed slots
                dict(batch_size=4, check_every=1, len_bucket=16),
                dict(batch_size=9, check_every=7, len_bucket=8),  # compaction to smaller buckets
                dict(batch_size=3, simple=True)]
    for v in variants:
        outs = engine.generate(model, prompts, **kw, **v)
        assert [o["completion_ids"] for o in outs] == [o["completion_ids"] for o in ref], v
        for a, b in zip(outs, ref):
            assert a["finished"] == b["finished"] and a["truncated"] == b["truncated"]
            assert torch.allclose(torch.tensor(a["logp"]), torch.tensor(b["logp"]), atol=1e-5)
    other = engine.generate(model, prompts, batch_size=16, **{**kw, "seed": 12})
    assert [o["completion_ids"] for o in other] != [o["completion_ids"] for o in ref]
    # row ids, not positions, pick the noise: a prompt sampled alone with its row id gives the same tokens
    alone = engine.generate(model, prompts[4:5], row_ids=[4], **kw)
    assert alone[0]["completion_ids"] == ref[4]["completion_ids"]


def test_bucket_and_compaction_edges():
    model = tiny("qwen2")
    lengths = [5, 3, 7, 2]
    prompts = prompts_of(lengths)
    greedy = hf_greedy(model, prompts, 24)
    kw = dict(pad_id=0, temperature=1.0, seed=5, len_bucket=8, check_every=3, batch_size=4)
    free = [o["completion_ids"] for o in engine.generate(model, prompts, max_new_tokens=24, stop_ids=[], **kw)]
    # a row that stops right at a bucket edge: a token of some row whose first occurrence makes the row's
    # length (prompt + completion) a multiple of the length bucket
    r, j = next((r, j) for r, g in enumerate(free) for j in range(1, 24)
                if g[j] not in g[:j] and (lengths[r] + j + 1) % 8 == 0)
    stop = free[r][j]
    outs = engine.generate(model, prompts, max_new_tokens=24, stop_ids=[stop], **kw)
    for o, g in zip(outs, free):  # stopping one row changes no token of any row
        n = next((j + 1 for j, x in enumerate(g) if x == stop), None)
        assert o["completion_ids"] == g[:n or 24]
        assert o["finished"] == (n is not None) and o["truncated"] == (n is None)
    assert outs[r]["completion_ids"] == free[r][:j + 1] and outs[r]["finished"]
    # every row stopping at once: each row's first greedy token is a stop token
    firsts = sorted({g[0] for g in greedy})
    outs = engine.generate(model, prompts, max_new_tokens=24, temperature=0, **{**GEN, "stop_ids": firsts})
    assert all(o["finished"] and len(o["completion_ids"]) == 1 for o in outs)
    # the token limit: per-row limits, one of them 1, others ending mid-chunk
    outs = engine.generate(model, prompts, max_new_tokens=[1, 4, 9, 24], temperature=0, batch_size=2, **GEN)
    assert [len(o["completion_ids"]) for o in outs] == [1, 4, 9, 24]
    assert [o["completion_ids"] for o in outs] == [g[:n] for g, n in zip(greedy, [1, 4, 9, 24])]
    assert all(o["truncated"] for o in outs)
    # an empty prompt list, one prompt
    assert engine.generate(model, [], max_new_tokens=4, temperature=0, **GEN) == []
    one = engine.generate(model, prompts[:1], max_new_tokens=24, temperature=0, **GEN)
    assert one[0]["completion_ids"] == greedy[0]


def test_bad_arguments_are_refused():
    model = tiny("qwen2")
    for kw in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(batch_size=0)):
        args = {"max_new_tokens": 4, **kw}
        with pytest.raises(ValueError):
            engine.generate(model, [[3, 4]], stop_ids=[], pad_id=0, **args)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate(model, [[]], max_new_tokens=4, stop_ids=[], pad_id=0)


def granite_hybrid():
    from transformers import AutoModelForCausalLM, GraniteMoeHybridConfig
    cfg = GraniteMoeHybridConfig(vocab_size=V, hidden_size=32, intermediate_size=32, shared_intermediate_size=32,
                                 num_hidden_layers=2, layer_types=["mamba", "attention"], num_attention_heads=4,
                                 num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                 mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                                 mamba_expand=2, logits_scaling=2.0, embedding_multiplier=3.0,
                                 position_embedding_type="rope", max_position_embeddings=512)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_hybrid_models_take_the_simple_path_with_one_logged_line(capsys):
    model = granite_hybrid()
    assert engine.direct_support(model) is not None
    engine._logged.clear()
    prompts = prompts_of([4, 7])
    outs = engine.generate(model, prompts, max_new_tokens=9, temperature=0.8, seed=2, **GEN)
    engine.generate(model, prompts, max_new_tokens=9, temperature=0.8, seed=2, **GEN)
    assert capsys.readouterr().err.count("using the simple path") == 1
    for p, o in zip(prompts, outs):
        z = model(torch.tensor([p + o["completion_ids"]])).logits[0, len(p) - 1:-1].float().detach()
        tf = torch.log_softmax(z / 0.8, -1).gather(-1, torch.tensor(o["completion_ids"])[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(o["logp"]), tf, atol=1e-5)


def test_generation_view_aliases_or_casts():
    model = tiny("qwen3")
    with engine.generation_view(model) as m:
        assert m is model and not m.training
    model.train()
    with engine.generation_view(model, torch.bfloat16) as m:
        assert m is not model and m.model.embed_tokens.weight.dtype == torch.bfloat16
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # tied: one copy
    assert model.training


def test_two_ranks_decode_without_collectives_and_match_one_rank(tmp_path):
    out = tmp_path / "ranks.json"
    run_cli(torchrun(2) + ["tests/dist/engine_check.py", str(out)], timeout=300)
    res = json.load(open(out))
    assert res["collectives_during_decode"] == [0, 0]
    assert res["unshard_aliases"] == [True, True]
    from dist.engine_check import prompts_and_ids, make_model
    model = make_model()
    prompts, ids = prompts_and_ids()
    one = engine.generate(model, prompts, row_ids=ids, **json.loads(res["kw"]))
    for r in range(2):
        mine = [o["completion_ids"] for o in one[r::2]]
        assert mine == res["completions"][r]
