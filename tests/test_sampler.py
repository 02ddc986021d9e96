"""sampler.py: the sampler draws its distribution exactly (every uniform of its grid enumerated on a
152k-token row), keeps only the top-p nucleus and top-p boundary ties as transformers does, reports
log π before top-p and log C, and its uniforms are a fixed function of (seed, row, t) with 53 random bits."""
import math

import pytest
import torch

import sampler


def test_top_p_keeps_only_the_nucleus():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    rows, t = torch.arange(4000), torch.zeros(4000, dtype=torch.long)
    nxt, logp, log_kept = sampler.sample_next(z, 1.0, 0.7, torch.tensor([0]), rows, t)
    counts = torch.bincount(nxt, minlength=4).float() / 4000
    assert counts[2] == 0 and counts[3] == 0  # mass before token 2 is 0.8 >= 0.7: dropped
    assert abs(counts[0] - 0.5 / 0.8) < 0.03 and abs(counts[1] - 0.3 / 0.8) < 0.03
    assert torch.allclose(logp, torch.log(torch.tensor([0.5, 0.3]))[nxt])  # log-prob before top-p
    assert torch.allclose(log_kept, torch.full((4000,), math.log(0.8)))  # the nucleus' mass C
    full, _, kept1 = sampler.sample_next(z, 1.0, 1.0, torch.tensor([0]), rows, t)
    assert (kept1 == 0).all()  # nothing cut: log C is exactly 0
    freq = torch.bincount(full, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.025)


def test_uniforms_are_a_fixed_function_of_seed_row_t():
    rows, t = torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2])
    u = sampler.uniforms(torch.tensor([7]), rows, t)
    assert torch.equal(u, sampler.uniforms(torch.tensor([7]), rows, t))
    assert not torch.equal(u, sampler.uniforms(torch.tensor([8]), rows, t))
    big = sampler.uniforms(torch.tensor([0]), torch.arange(100_000), torch.zeros(100_000, dtype=torch.long))
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
    """Exact enumeration (sampler.drawn_probabilities: what each uniform of the 2^53 grid selects) on a
    high-entropy row of 152,064 logits (entropy 9.9 nats): total variation to the definition <= 1e-5
    and every token of nonzero probability drawn by some uniform; nothing outside the nucleus or past the
    tokenizer. (A float32 CDF with 24-bit uniforms: TV 1.5e-3, 6,699 tokens never drawn at top-p 1;
    bench/bench_sampler.py.) The sampler's real draws are the enumeration's tokens for their uniforms."""
    z = torch.randn(1, V_REAL, generator=torch.Generator().manual_seed(0)) * 2.0
    p, keep = nucleus_reference(z, temperature, top_p, vocab)
    q = sampler.drawn_probabilities(z, temperature, top_p, vocab)
    assert 0.5 * (q - p).abs().sum().item() <= 1e-5
    assert (q[keep] > 0).all() and (q[~keep] == 0).all() and keep[:vocab].sum() > 1000
    # sample_next on the same row: each token is the one whose enumerated interval holds its uniform
    seed, rows, t = torch.tensor([5]), torch.arange(16), torch.arange(16) * 7
    nxt, logp, log_kept = sampler.sample_next(z.expand(16, -1), temperature, top_p, seed, rows, t, vocab)
    _, order, _ = sampler.kept_weights(z, temperature, top_p, vocab)
    order = torch.arange(V_REAL) if order is None else order[0]
    cum = q[order].cumsum(0)  # exact: multiples of 2^-53 below 1
    assert torch.equal(nxt, order[torch.searchsorted(cum, sampler.uniforms(seed, rows, t), right=True)])
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
        nxt, _, _ = sampler.sample_next(z.expand(3000, -1), 1.0, top_p, torch.tensor([1]), rows, t)
        assert set(nxt.tolist()) == hf, (p.tolist(), top_p, sorted(hf))
