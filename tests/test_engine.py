"""engine.py: greedy tokens equal model.generate for Qwen2, Llama and Qwen3; sampled log-probs equal a
teacher-forced forward; the sampler draws its distribution exactly (every uniform of its grid enumerated
on a 152k-token row), keeps top-p boundary ties as transformers does and never draws an id past the
tokenizer; sampling is a pure function of (seed, row, t) (batch size, refill, compaction, buckets and the
path taken change nothing); bucket and compaction edges; the simple path for hybrid models; 2 gloo ranks
decode without a single collective and match one rank."""
import json
import math

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


def test_top_p_keeps_only_the_nucleus():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    rows, t = torch.arange(4000), torch.zeros(4000, dtype=torch.long)
    nxt, logp, log_kept = engine.sample_next(z, 1.0, 0.7, torch.tensor([0]), rows, t)
    counts = torch.bincount(nxt, minlength=4).float() / 4000
    assert counts[2] == 0 and counts[3] == 0  # mass before token 2 is 0.8 >= 0.7: dropped
    assert abs(counts[0] - 0.5 / 0.8) < 0.03 and abs(counts[1] - 0.3 / 0.8) < 0.03
    assert torch.allclose(logp, torch.log(torch.tensor([0.5, 0.3]))[nxt])  # log-prob before top-p
    assert torch.allclose(log_kept, torch.full((4000,), math.log(0.8)))  # the nucleus' mass C
    full, _, kept1 = engine.sample_next(z, 1.0, 1.0, torch.tensor([0]), rows, t)
    assert (kept1 == 0).all()  # nothing cut: log C is exactly 0
    freq = torch.bincount(full, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.025)


def test_uniforms_are_a_fixed_function_of_seed_row_t():
    rows, t = torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2])
    u = engine.uniforms(torch.tensor([7]), rows, t)
    assert torch.equal(u, engine.uniforms(torch.tensor([7]), rows, t))
    assert not torch.equal(u, engine.uniforms(torch.tensor([8]), rows, t))
    big = engine.uniforms(torch.tensor([0]), torch.arange(100_000), torch.zeros(100_000, dtype=torch.long))
    assert 0 <= big.min() and big.max() < 1 and abs(big.mean() - 0.5) < 0.005 and len(big.unique()) > 99_000
    # 53 random bits: u is on the grid k / 2^53, and its low bits (below 2^-24) are uniform too
    k = big * 2.0 ** 53
    assert big.dtype == torch.float64 and torch.equal(k, k.floor())
    low = (k % 2 ** 29) / 2 ** 29  # the bits a 24-bit uniform does not have
    assert abs(low.mean() - 0.5) < 0.005 and abs(torch.corrcoef(torch.stack([big, low]))[0, 1]) < 0.02


V_REAL = 152_064  # DeepSeek-R1-Distill-Qwen-7B's lm_head rows (its tokenizer has 151,665 tokens)


def nucleus_reference(z, temperature, top_p, vocab):
    """The distribution to draw from, by its definition in float64: softmax(z / τ) over the ids below vocab,
    the most likely tokens kept while the mass ranked above is below top_p, renormalised (no ties here)."""
    p = torch.softmax(z[0].double() / temperature, -1)
    p[vocab:] = 0
    s, idx = p.sort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[idx[(s.cumsum(0) - s) < top_p * p.sum()]] = True
    return p * keep / (p * keep).sum(), keep


@pytest.mark.parametrize("temperature, top_p, vocab", [(1.0, 1.0, V_REAL), (0.7, 0.9, 151_665)])
def test_sampler_draws_the_exact_distribution_on_a_152k_row(temperature, top_p, vocab):
    """Exact enumeration (engine.drawn_probabilities: what each uniform of the 2^53 grid selects) on a
    high-entropy row of 152,064 logits (entropy 9.9 nats): total variation to the definition <= 1e-5
    and every token of nonzero probability drawn by some uniform; nothing outside the nucleus or past the
    tokenizer. (A float32 CDF with 24-bit uniforms: TV 1.5e-3, 6,699 tokens never drawn at top-p 1;
    bench/bench_sampler.py.) The sampler's real draws are the enumeration's tokens for their uniforms."""
    z = torch.randn(1, V_REAL, generator=torch.Generator().manual_seed(0)) * 2.0
    p, keep = nucleus_reference(z, temperature, top_p, vocab)
    q = engine.drawn_probabilities(z, temperature, top_p, vocab)
    assert 0.5 * (q - p).abs().sum().item() <= 1e-5
    assert (q[keep] > 0).all() and (q[~keep] == 0).all() and keep[:vocab].sum() > 1000
    # sample_next on the same row: each token is the one whose enumerated interval holds its uniform
    seed, rows, t = torch.tensor([5]), torch.arange(16), torch.arange(16) * 7
    nxt, logp, log_kept = engine.sample_next(z.expand(16, -1), temperature, top_p, seed, rows, t, vocab)
    _, order, _ = engine.kept_weights(z, temperature, top_p, vocab)
    order = torch.arange(V_REAL) if order is None else order[0]
    cum = q[order].cumsum(0)  # exact: multiples of 2^-53 below 1
    assert torch.equal(nxt, order[torch.searchsorted(cum, engine.uniforms(seed, rows, t), right=True)])
    full = torch.log_softmax(z[0].double() / temperature, -1)
    assert torch.allclose(logp.double(), full[nxt], atol=1e-6)  # log π before top-p and the vocabulary cut
    C = full.exp()[keep].sum()
    assert torch.allclose(log_kept.double(), C.log().expand(16), atol=1e-6) and (log_kept < 0).all() == (top_p < 1)


def test_top_p_boundary_ties_keep_the_members_transformers_keeps():
    """A tie on the nucleus boundary: transformers' TopPLogitsWarper (and vLLM) keep the tied tokens its
    ascending sort puts last (the higher ids); so does the sampler, wherever the tie sits."""
    from transformers.generation.logits_process import TopPLogitsWarper
    rows, t = torch.arange(3000), torch.zeros(3000, dtype=torch.long)
    cases = []
    for perm in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]):
        p = torch.tensor([0.4, 0.2, 0.2, 0.2])[torch.tensor(perm)]
        cases += [(p, 0.5), (p, 0.7), (p, 0.3)]
    p = torch.tensor([0.05, 0.3, 0.1, 0.05, 0.1, 0.1, 0.2, 0.1])
    cases += [(p, 0.55), (p, 0.65), (p, 0.75), (p, 0.85)]  # between partial sums: no rounding decides
    for p, top_p in cases:
        z = torch.log(p)[None]
        hf = set(torch.isfinite(TopPLogitsWarper(top_p)(None, z.clone()))[0].nonzero().flatten().tolist())
        nxt, _, _ = engine.sample_next(z.expand(3000, -1), 1.0, top_p, torch.tensor([1]), rows, t)
        assert set(nxt.tolist()) == hf, (p.tolist(), top_p, sorted(hf))


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
    run_cli(torchrun(2) + ["tests/dist_engine_check.py", str(out)], timeout=300)
    res = json.load(open(out))
    assert res["collectives_during_decode"] == [0, 0]
    assert res["unshard_aliases"] == [True, True]
    from dist_engine_check import prompts_and_ids, make_model
    model = make_model()
    prompts, ids = prompts_and_ids()
    one = engine.generate(model, prompts, row_ids=ids, **json.loads(res["kw"]))
    for r in range(2):
        mine = [o["completion_ids"] for o in one[r::2]]
        assert mine == res["completions"][r]
