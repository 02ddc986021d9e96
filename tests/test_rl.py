"""rl.py: the estimators (tied groups exactly 0), the KL, the clipped loss (hand-computed), the loss
aggregations against verl's and TRL's formulas, rank / micro-batch invariance, on-policy ratios, masks
with pad == eos, learning, resume and the CLIs."""
import json
import math
import os
import sys
from decimal import Decimal, localcontext

import pytest
import torch

from conftest import build_model, build_tokenizer, run_cli, torchrun, write_jsonl

import common
import engine
import errors
import rl


def T(*x):
    return torch.tensor(x, dtype=torch.float32)


def lengths_mask(lengths, T_):
    return torch.arange(T_)[None, :] < torch.tensor(lengths)[:, None]


# ------------------------------------------------------------------------------------------------ math

def test_reinforcepp_whitens_returns_over_all_tokens():
    # R = [1, -1], lengths [2, 1], no KL: G = [[1, 1], [-1, .]]; tokens {1, 1, -1}: mean 1/3, var 8/9
    mask = lengths_mask([2, 1], 2)
    z = torch.zeros(2, 2)
    adv = rl.compute_advantages(T(1, -1), z, z, mask, kl_coef=0.0)
    assert torch.allclose(adv, torch.tensor([[0.70711, 0.70711], [-1.41421, 0.0]]), atol=1e-5)


def test_rewards_are_clipped_before_whitening():
    mask = lengths_mask([1, 1, 1], 1)
    z = torch.zeros(3, 1)
    adv = rl.compute_advantages(T(20, 0, 4), z, z, mask, kl_coef=0.0)  # clipped to [10, 0, 4]
    assert torch.allclose(adv.squeeze(1), T(1.29777, -1.13555, -0.16222), atol=1e-4)


def test_reinforcepp_discounted_returns():
    # γ = 0.5, R = 4 on the last of 3 tokens: G = [1, 2, 4]; mean 7/3, var 14/9
    mask = lengths_mask([3], 3)
    z = torch.zeros(1, 3)
    adv = rl.compute_advantages(T(4), z, z, mask, kl_coef=0.0, gamma=0.5)
    assert torch.allclose(adv, torch.tensor([[-1.06904, -0.26726, 1.33631]]), atol=1e-4)


def test_rloo_with_kl_in_reward_hand_computed():
    # group [3, 1] -> leave-one-out [2, -2]; r_t = -0.1·(logp_old - logp_ref) plus R on the last token
    mask = lengths_mask([3, 2], 3)
    logp_ref = torch.zeros(2, 3)
    logp_old = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.4, 9.0]])  # 9.0 is off the mask
    adv = rl.compute_advantages(T(3, 1), logp_old, logp_ref, mask, estimator="rloo", kl_coef=0.1, group_size=2)
    # row 0: r = [-0.05, 0.02, 1.99] -> G = [1.96, 2.01, 1.99]; row 1: r = [-0.03, -2.04] -> G = [-2.07, -2.04]
    assert torch.allclose(adv, torch.tensor([[1.96, 2.01, 1.99], [-2.07, -2.04, 0.0]]), atol=1e-6)


def test_grpo_group_zscore_not_whitened():
    mask = lengths_mask([2, 1, 1, 1], 2)
    z = torch.zeros(4, 2)
    adv = rl.compute_advantages(T(1, 3, 5, 5), z, z, mask, estimator="grpo", kl_coef=0.0, group_size=2)
    # group 1: mean 2, unbiased std sqrt(2); group 2: all equal -> 0
    assert torch.allclose(adv, torch.tensor([[-0.70711, -0.70711], [0.70711, 0], [0, 0], [0, 0]]), atol=1e-5)


def group_reference(g, estimator, std=True):
    """The shaped rewards of one group from their definitions, in 60-digit decimal arithmetic on the exact
    float32 values (the mean of equal values is them exactly)."""
    with localcontext() as ctx:
        ctx.prec = 60
        x = [Decimal(float(v)) for v in g]
        n = len(x)
        mean = sum(x) / n
        if estimator == "rloo":
            a = [v - (sum(x) - v) / (n - 1) for v in x]
        elif estimator == "grpo" and std:
            sd = (sum((v - mean) ** 2 for v in x) / (n - 1)).sqrt()
            a = [(v - mean) / (sd + Decimal(1e-9)) for v in x]
        else:
            a = [v - mean for v in x]
        return [float(min(max(v, Decimal(-10)), Decimal(10))) for v in a]


ARMS = [("grpo", True), ("grpo", False), ("rloo", True), ("reinforce++-baseline", True)]


@pytest.mark.parametrize("kind", ["equal", "1 ulp apart", "distinct"])
def test_tied_groups_get_exactly_zero_and_every_group_its_exact_value(kind):
    """n = 2..32, values of both signs and many magnitudes: equal rewards -> exactly 0 under every baseline
    (float32 statistics give grpo ±10 on 11-68 % of such groups for n = 3, 5-8, 12, 16, 32); a group
    with one reward 1 ulp up, or distinct rewards, gets its exact shaped reward (to float32 rounding)."""
    g = torch.Generator().manual_seed(0)
    values = T(0.3, 1.7, -2.9, 0.1, 7.77, -123.456, 1e-3, 3e4)
    for n in range(2, 33):
        if kind == "equal":
            R = values[:, None].expand(-1, n).clone()  # (8, n)
        elif kind == "1 ulp apart":
            R = values[:, None].expand(-1, n).clone()
            R[:, n // 2] = torch.nextafter(values, torch.full_like(values, math.inf))
        else:
            R = values[:, None] + torch.randn(len(values), n, generator=g) * 3
        for est, std in ARMS:
            got = rl.shaped_rewards(R.reshape(-1), est, n, std).view(len(values), n)
            if kind == "equal":
                assert (got == 0).all(), (n, est, std)
            for row, out in zip(R, got):
                ref = torch.tensor(group_reference(row, est, std), dtype=torch.float64)
                assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-30), (kind, n, est, std, out, ref)
            if est == "grpo" and std:
                assert got.abs().max() <= (n - 1) / math.sqrt(n) + 1e-5  # a z-score: the ±10 clip never binds
    R = T(0.3, 0.3, 0.3, 1.7, 1.7, 1.7, 0.3, 0.3, 1.0)
    assert rl.equal_groups(R, 3) == 2  # the step log still counts them


def test_grpo_on_three_tied_groups_of_eight_is_zero():
    R = torch.tensor([0.3] * 8 + [1.7] * 8 + [-2.9] * 8)
    assert rl.shaped_rewards(R, "grpo", 8).view(3, 8)[:, 0].tolist() == [0.0, 0.0, 0.0]


def test_whitening_a_rollout_of_equal_returns_gives_exactly_zero():
    """reinforce++ and reinforce++-baseline divide by the rollout's spread too: returns all equal (no KL,
    one reward for every sample; or every group tied) must whiten to 0, not to rounding noise x 1e4."""
    g = torch.Generator().manual_seed(0)
    for B in (3, 5, 8, 17, 64):
        for T_ in (1, 7, 33, 200):
            mask = lengths_mask(torch.randint(1, T_ + 1, (B,), generator=g).tolist(), T_)
            z = torch.zeros(B, T_)
            for v in (0.3, 1.7, -2.9, 0.1, 7.7):
                adv = rl.compute_advantages(torch.full((B,), v), z, z, mask, kl_coef=0.0)
                assert (adv == 0).all(), (B, T_, v)
            if B % 4 == 0:  # every group of 4 tied: shaped rewards 0, then whitened
                R = T(0.3, 1.7, -2.9, 0.1).repeat_interleave(4).repeat(B)[:B]
                adv = rl.compute_advantages(R, z, z, mask, estimator="reinforce++-baseline", kl_coef=0.0, group_size=4)
                assert (adv == 0).all(), (B, T_)


def test_no_std_is_dr_grpo_and_only_for_grpo(tmp_path):
    R = T(1, 3, 5, 5, 0.5, 0.5)
    assert torch.equal(rl.shaped_rewards(R, "grpo", 2, std=False), T(-1, 1, 0, 0, 0, 0))  # R - group mean
    assert torch.equal(rl.shaped_rewards(R, "grpo", 2, std=False), rl.shaped_rewards(R, "reinforce++-baseline", 2))
    with pytest.raises(errors.UsageError, match="--no-std"):
        rl.main(["--model", str(tmp_path / "none"), "--prompts", "x.jsonl", "--out", str(tmp_path / "o"),
                 "--rule", "format", "--estimator", "rloo", "--no-std"])
    assert not (tmp_path / "o").exists()


def test_reinforcepp_baseline_subtracts_group_mean_then_whitens():
    mask = lengths_mask([1, 1, 1, 1], 1)
    z = torch.zeros(4, 1)
    adv = rl.compute_advantages(T(1, 3, 10, 10), z, z, mask, estimator="reinforce++-baseline", kl_coef=0.0,
                                group_size=2)
    assert torch.allclose(adv.squeeze(1), T(-1.41421, 1.41421, 0, 0), atol=1e-5)
    assert rl.equal_groups(T(1, 3, 10, 10), 2) == 1


def test_kl_in_loss_leaves_rewards_alone():
    # the KL goes to the loss instead: advantages are the bare leave-one-out rewards
    mask = lengths_mask([2, 2], 2)
    lo = torch.tensor([[5.0, 5.0], [1.0, 1.0]])
    adv = rl.compute_advantages(T(1, 0), lo, torch.zeros(2, 2), mask, estimator="rloo", kl_coef=0.5,
                                kl_in="loss", group_size=2)
    assert torch.allclose(adv, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))


def test_kl_estimators():
    d = torch.linspace(-30, 30, 101)
    assert torch.equal(rl.kl_estimate(d, torch.zeros_like(d), "k1"), d.clamp(-10, 10))
    assert (rl.kl_estimate(d, torch.zeros_like(d), "k2") >= 0).all()
    assert (rl.kl_estimate(d, torch.zeros_like(d), "k3") >= 0).all()
    # on-policy: E_π[k1] = E_π[k3] = KL(π || π_ref), where the output clamp never binds (|d| < 2.4 here)
    g = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(50, generator=g) * 0.5, torch.randn(50, generator=g) * 0.5
    lp, lr = logits.log_softmax(0), ref_logits.log_softmax(0)
    assert (lp - lr).abs().max() < 2.4  # k3 <= e^2.4 - 3.4 < 10
    x = torch.multinomial(lp.exp(), 400_000, replacement=True, generator=g)
    exact = (lp.exp() * (lp - lr)).sum()
    k1 = rl.kl_estimate(lp[x], lr[x], "k1").mean()
    k3 = rl.kl_estimate(lp[x], lr[x], "k3").mean()
    assert abs(k1 - exact) < 0.03 * exact and abs(k3 - exact) < 0.03 * exact



def test_kl_estimators_clamp_their_output_not_d():
    # as OpenRLHF's compute_approx_kl: the estimator's value is clamped to [-10, 10], d itself is not
    d = T(-15, -4, -2, 3, 15)
    z = torch.zeros_like(d)
    assert torch.allclose(rl.kl_estimate(d, z, "k1"), T(-10, -4, -2, 3, 10))
    assert torch.allclose(rl.kl_estimate(d, z, "k2"), T(10, 8, 2, 4.5, 10))        # d²/2: 112.5 -> 10, 8, 2, 4.5
    k3 = rl.kl_estimate(d, z, "k3")                                                # e^(-d) - 1 + d
    assert torch.allclose(k3, T(10, 10, math.exp(2) - 3, math.exp(-3) + 2, 10))    # e^15 - 16, e^4 - 5 -> 10
    assert k3[0].item() == 10.0  # a clamped d would give e^10 - 11 = 22015.5


def test_arms_subtract_the_baseline_from_the_raw_reward_then_clip():
    # raw RM logits beyond ±10: OpenRLHF subtracts the group baseline first, then clips the shaped reward
    R = T(30, 0, 2, 0)
    assert torch.equal(rl.shaped_rewards(R, "reinforce++", 2), T(10, 0, 2, 0))     # no baseline: clip(R)
    assert torch.equal(rl.shaped_rewards(R, "reinforce++-baseline", 2), T(10, -10, 1, -1))  # ±15 -> ±10
    assert torch.equal(rl.shaped_rewards(T(14, 2), "rloo", 2), T(10, -10))          # ±12 -> ±10 (clip first: ±8)
    # grpo: z-score of the RAW group [30, 5, 0, 0]: mean 8.75, unbiased std sqrt(618.75 / 3)
    std = math.sqrt(618.75 / 3)
    zs = T(21.25 / std, -3.75 / std, -8.75 / std, -8.75 / std)                      # clip first: [1.306, 0.261, ...]
    assert torch.allclose(rl.shaped_rewards(T(30, 5, 0, 0), "grpo", 4), zs, atol=1e-5)
    # end to end: rloo is not whitened, so the advantage is the shaped reward; the baseline arm whitens
    # [10, -10, 1, -1] (mean 0, population variance 50.5)
    mask = lengths_mask([1, 1], 1)
    assert torch.equal(rl.compute_advantages(T(14, 2), torch.zeros(2, 1), torch.zeros(2, 1), mask, estimator="rloo",
                                             kl_coef=0.0, group_size=2), T(10, -10)[:, None])
    mask = lengths_mask([1, 1, 1, 1], 1)
    adv = rl.compute_advantages(R, torch.zeros(4, 1), torch.zeros(4, 1), mask, estimator="reinforce++-baseline",
                                kl_coef=0.0, group_size=2)
    assert torch.allclose(adv.squeeze(1), T(10, -10, 1, -1) / math.sqrt(50.5), atol=1e-6)


def test_arms_refuse_a_discount(tmp_path):
    mask = lengths_mask([2, 2], 2)
    with pytest.raises(ValueError, match="γ = 1"):
        rl.compute_advantages(T(1, 0), torch.zeros(2, 2), torch.zeros(2, 2), mask, estimator="rloo", group_size=2,
                              gamma=0.9)
    with pytest.raises(errors.UsageError, match="--gamma"):  # before anything is loaded
        rl.main(["--model", str(tmp_path / "none"), "--prompts", "x.jsonl", "--out", str(tmp_path / "o"),
                 "--rule", "format", "--estimator", "grpo", "--gamma", "0.99"])
    assert not (tmp_path / "o").exists()

def test_policy_loss_clip_cases():
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv = T(1, -1, -1)[None]
    logp_old = torch.zeros(1, 3)
    logp = torch.log(T(1.5, 0.5, 1.5))[None]
    loss, st = rl.policy_loss(logp, logp_old, adv, mask)
    # -min(ρA, clip(ρ)A): 1.5 -> -1.2 (clipped); ρ=0.5, A<0 -> 0.8 (clipped); ρ=1.5, A<0 -> 1.5 (not clipped)
    assert math.isclose(loss.item(), -1.2 + 0.8 + 1.5, abs_tol=1e-5)
    assert math.isclose(st["clip_frac"].item(), 2 / 3, abs_tol=1e-6)
    # clip-higher: ρ = 1.25, A > 0 is inside [1 - 0.2, 1 + 0.28]
    lp = torch.log(T(1.25))[None]
    one = torch.ones(1, 1, dtype=torch.bool)
    assert math.isclose(rl.policy_loss(lp, torch.zeros(1, 1), T(1)[None], one)[0].item(), -1.2, abs_tol=1e-5)
    assert math.isclose(rl.policy_loss(lp, torch.zeros(1, 1), T(1)[None], one, eps_high=0.28)[0].item(), -1.25,
                        abs_tol=1e-5)
    # dual clip c = 3: ρ = 5, A = -1: -min(-5, -1.2) = 5, floored objective -> loss 3
    lp = torch.log(T(5.0))[None]
    assert math.isclose(rl.policy_loss(lp, torch.zeros(1, 1), T(-1)[None], one)[0].item(), 5.0, abs_tol=1e-4)
    assert math.isclose(rl.policy_loss(lp, torch.zeros(1, 1), T(-1)[None], one, dual_clip=3.0)[0].item(), 3.0,
                        abs_tol=1e-4)
    # masked tokens contribute nothing
    m = torch.tensor([[True, False, False]])
    assert math.isclose(rl.policy_loss(logp, logp_old, adv, m)[0].item(), -1.2, abs_tol=1e-5)


def peer_batch():
    g = torch.Generator().manual_seed(3)
    B, T_ = 6, 9
    mask = lengths_mask([9, 2, 5, 1, 7, 4], T_)
    logp_old = -torch.rand(B, T_, generator=g) * 2
    logp = logp_old + 0.5 * torch.randn(B, T_, generator=g)
    adv = (torch.randn(B, 1, generator=g) * 2).expand(B, T_) * mask
    return logp, logp_old, adv, mask


def verl_pg_losses(logp, logp_old, adv, eps=0.2, clip_ratio_c=3.0):
    """verl core_algos compute_policy_loss_vanilla's per-token loss, from its definition: ρ = exp(clamp(Δ, ±20)),
    max(-Aρ, -A clip(ρ)), and for A < 0 the dual clip min(that, -A·c)."""
    ratio = torch.exp((logp - logp_old).clamp(-20, 20))
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    return torch.where(adv < 0, torch.minimum(clipped, -adv * clip_ratio_c), clipped)


def test_loss_aggregations_equal_verl_and_trl_formulas_on_a_fixed_batch():
    """Each --loss-agg against the peers' documented aggregations of the same per-token losses (verl
    core_algos.agg_loss; TRL GRPOTrainer's loss_type), through policy_loss with loss_weights."""
    logp, logp_old, adv, mask = peer_batch()
    m = mask.float()
    B, L = m.shape[0], 12  # L: the generation limit (--max-new-tokens)
    for dual in (None, 3.0):
        lmat = verl_pg_losses(logp, logp_old, adv, clip_ratio_c=dual or math.inf)  # (B, T)
        seq_sum, lens = (lmat * m).sum(-1), m.sum(-1)
        peers = {
            "token-mean": [(lmat * m).sum() / m.sum()],                   # verl token-mean; TRL dapo
            "seq-mean-token-mean": [(seq_sum / lens).mean()],               # verl seq-mean-token-mean; TRL grpo
            "seq-mean-token-sum": [seq_sum.mean()],                         # verl seq-mean-token-sum
            "seq-mean-token-sum-norm": [(lmat * m).sum() / (B * L),         # TRL dr_grpo
                                        seq_sum.sum() / L / B],             # verl (loss_scale_factor L) / N
        }
        for agg, refs in peers.items():
            w = rl.loss_weights(mask, agg, B, m.sum(), L)
            ours, _ = rl.policy_loss(logp, logp_old, adv, mask, dual_clip=dual, weight=w)
            for ref in refs:
                assert torch.allclose(ours, ref, rtol=1e-6), (agg, dual, ours, ref)
    # the default aggregation is today's: the plain sum divided by the step's token count
    assert torch.allclose(rl.policy_loss(logp, logp_old, adv, mask)[0] / m.sum(),
                          rl.policy_loss(logp, logp_old, adv, mask, weight=rl.loss_weights(mask, "token-mean", B,
                                                                                          m.sum(), L))[0])


@pytest.mark.parametrize("agg", rl.LOSS_AGGS)
def test_loss_aggregation_does_not_depend_on_the_micro_batch_split(agg):
    logp, logp_old, adv, mask = peer_batch()
    n_seq, n_tok = mask.shape[0], mask.sum().float()
    whole, _ = rl.policy_loss(logp, logp_old, adv, mask, weight=rl.loss_weights(mask, agg, n_seq, n_tok, 12))
    for split in ([3, 3], [1, 4, 1], [5, 1], [1] * 6):
        parts, i = 0.0, 0
        for k in split:
            s = slice(i, i + k)
            Tm = int(mask[s].sum(1).max())  # a micro-batch is padded to its own longest row
            w = rl.loss_weights(mask[s, :Tm], agg, n_seq, n_tok, 12)
            parts = parts + rl.policy_loss(logp[s, :Tm], logp_old[s, :Tm], adv[s, :Tm], mask[s, :Tm], weight=w)[0]
            i += k
        assert torch.allclose(parts, whole, rtol=1e-6), (agg, split)


@pytest.fixture(scope="module")
def two_ranks(tiny_model, tmp_path_factory):
    """One torchrun launch of tests/dist/rl_check.py (both of its checks): its saved results."""
    d = tmp_path_factory.mktemp("two_ranks")
    p = prompts_file(d)
    run_cli(torchrun(2) + ["tests/dist/rl_check.py", str(d / "two.pt"), tiny_model, p, str(d / "rl")])
    return torch.load(d / "two.pt"), p


def test_whitening_and_loss_identical_on_one_and_two_ranks(two_ranks):
    sys.path.insert(0, os.path.dirname(__file__))
    from dist import rl_check
    two = two_ranks[0]["adv"]
    assert len(two) == len(rl_check.CASES)
    for case in rl_check.CASES:
        adv, loss = rl_check.loss_and_adv(*rl_check.batch(), *case)
        assert torch.allclose(adv, two[case][0], atol=1e-6), case
        assert abs(loss.item() - two[case][1].item()) < 1e-6, case


def test_gradients_before_clipping_identical_on_one_and_two_ranks(tiny_model, two_ranks, tmp_path):
    """One rl.py step on a fixed rollout (tests/dist/rl_check.py), with the default token mean and with a
    sequence mean (plus the entropy term, aggregated alike): FSDP2 averages gradients over the 2 ranks,
    `loss * world` with the step's global counts in the weights makes that the global aggregate, so every
    gradient equals the 1-rank one (without the × world they would be halved on 2 ranks)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from dist import rl_check
    for k, extra in enumerate(rl_check.RUNS):
        one = rl_check.run(tiny_model, two_ranks[1], str(tmp_path / f"one{k}"), *extra)
        two = two_ranks[0]["grads"][k]
        assert len(one) == len(two) > 0 and sum(g.norm() for g in one) > 0
        for a, b in zip(one, two):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-7), \
                (extra, ((a - b).norm() / a.norm()).item())


# ------------------------------------------------------------------------------------------------ masks and ratios

def test_first_ppo_step_has_ratio_one_and_matches_sampler(tiny_model):
    tok = common.load_tokenizer(tiny_model)
    policy = common.Policy(common.load_model(tiny_model)).eval()
    prompts = [common.render_prompt(tok, p) for p in ["hi", "How do I pick a lock, please?", "What is 1+1?"]]
    outs = engine.generate(policy, prompts, max_new_tokens=12, stop_ids=common.stop_token_ids(tok, policy.hf),
                           pad_id=tok.pad_token_id, temperature=0.7, seed=0)
    items = [{"prompt_ids": p, "completion_ids": o["completion_ids"]} for p, o in zip(prompts, outs)]
    with torch.no_grad():
        logp_old, _, mask = rl.response_logprobs(policy, items, tok.pad_token_id, 0.7, "cpu")
        logp, _, _ = rl.response_logprobs(policy, items, tok.pad_token_id, 0.7, "cpu")
    sampler = common.pad_right([o["logp"] for o in outs], length=mask.shape[1], dtype=torch.float32)[0]
    assert torch.allclose(logp_old[mask], sampler[mask], atol=1e-5)
    _, st = rl.policy_loss(logp, logp_old, torch.randn_like(logp), mask)
    assert st["ratio_mean"].item() == 1.0 and st["n_clipped"].item() == 0


def test_left_padding_positions_match_unpadded_forward(tiny_model):
    tok = common.load_tokenizer(tiny_model)
    model = common.load_model(tiny_model).eval()
    short, long_ = common.render_prompt(tok, "hi"), common.render_prompt(tok, "a much longer prompt than the other")
    kw = dict(max_new_tokens=6, stop_ids=[], pad_id=tok.pad_token_id, temperature=0)
    alone = engine.generate(model, [short], **kw)[0]
    batched = engine.generate(model, [long_, short], **kw)[1]
    assert alone["completion_ids"] == batched["completion_ids"]
    assert torch.allclose(torch.tensor(alone["logp"]), torch.tensor(batched["logp"]), atol=1e-5)


def test_pad_equal_to_eos_keeps_the_real_eos(tmp_path):
    d = tmp_path / "padeos"
    tok = build_tokenizer(d)
    tok.pad_token = tok.eos_token  # pad == eos, as in many real checkpoints
    tok.save_pretrained(d)
    build_model(d, tok)
    tok = common.load_tokenizer(str(d))
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    items = [{"prompt_ids": [5, 6, 7], "completion_ids": [10, 11, eos]}, {"prompt_ids": [5], "completion_ids": [12]}]
    ids, attn, pos, P, resp = rl.collate(items, tok.pad_token_id, "cpu")
    assert resp.tolist() == [[True, True, True], [True, False, False]]  # the finished row's eos is a target
    adv = rl.compute_advantages(T(1.0, 0.0), torch.zeros(2, 3), torch.zeros(2, 3), resp, estimator="rloo",
                                kl_coef=0.0, group_size=2)
    assert adv[0, 2] == 1.0 and adv[1, 0] == -1.0  # the reward sits on the eos token
    assert pos[1].tolist()[P - 1:P + 1] == [0, 1]  # left padding: positions from the mask, not the pad value


# ------------------------------------------------------------------------------------------------ CLI runs

def prompts_file(tmp_path, n=8):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me thing {i}."} for i in range(n)])


def rl_args(model, prompts, out, *extra):
    return ["--model", model, "--prompts", prompts, "--out", str(out), "--rollout-batch", "4",
            "--samples-per-prompt", "4", "--train-batch", "8", "--max-new-tokens", "8", "--seed", "1",
            "--lr", "3e-3", "--kl-coef", "0.01", "--save-every", "1000", "--dump-every", "0", *extra]


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_invariant_to_micro_batch_split(tiny_model, tmp_path, agg):
    p = prompts_file(tmp_path)
    rl.main(rl_args(tiny_model, p, tmp_path / "a", "--rule", "format", "--max-steps", "2", "--micro-batch-size", "16",
                    "--loss-agg", agg))
    rl.main(rl_args(tiny_model, p, tmp_path / "b", "--rule", "format", "--max-steps", "2", "--micro-batch-size", "3",
                    "--loss-agg", agg))
    for x, y in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b")):
        for k in ("reward", "kl", "loss", "grad_norm", "entropy"):
            assert abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])), (k, x[k], y[k])


def test_resume_matches_uninterrupted(tiny_model, tmp_path):
    p = prompts_file(tmp_path)
    full = rl.main(rl_args(tiny_model, p, tmp_path / "full", "--rule", "format", "--max-steps", "4"))
    rl.main(rl_args(tiny_model, p, tmp_path / "part", "--rule", "format", "--max-steps", "4", "--stop-at", "2"))
    resumed = rl.main(rl_args(tiny_model, p, tmp_path / "part", "--rule", "format", "--max-steps", "4", "--resume"))
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in ("reward", "kl", "loss", "grad_norm", "lr"):
            assert x[k] == y[k], (k, x, y)
    for (k, v), (_, w) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(v, w), k


LEARN = ["--rule", "format", "--max-steps", "30", "--rollout-batch", "4", "--samples-per-prompt", "8",
         "--train-batch", "32", "--epochs-per-rollout", "2", "--max-new-tokens", "6", "--lr", "2e-2",
         "--warmup-ratio", "0", "--kl-coef", "0", "--temperature", "1.0"]


def assert_learned(out):
    r = [m["reward"] for m in metrics(out)]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.3, r


def test_learns_to_close_its_thinking(tiny_model, tmp_path):
    # format pays 1 when "</think>" (one token) is followed by an answer: a random model rarely does it
    rl.main(["--model", tiny_model, "--prompts", prompts_file(tmp_path), "--out", str(tmp_path / "o"),
             "--save-every", "1000", "--dump-every", "10", *LEARN])
    assert_learned(tmp_path / "o")
    recs = [json.loads(line) for line in open(tmp_path / "o" / "rollouts" / "step_00030.jsonl")]
    assert len(recs) == 32 and {"prompt", "completion", "reasoning", "answer", "think_closed", "score"} <= recs[0].keys()


def test_rollout_dumps_say_their_temperature_and_entropy_scores_them_at_it(tiny_model, tmp_path):
    """A dumped rollout record carries the temperature and top-p it was sampled at, and entropy.py reads the
    temperature from the records (not a fallback of its own, whatever rl sampled at)."""
    import records
    out = tmp_path / "d"
    rl.main(rl_args(tiny_model, prompts_file(tmp_path), out, "--rule", "format", "--max-steps", "1",
                    "--dump-every", "1", "--temperature", "0.9", "--top-p", "0.95"))
    path = str(out / "rollouts" / "step_00001.jsonl")
    recs = [json.loads(line) for line in open(path)]
    assert len(recs) == 16 and {(r["temperature"], r["top_p"]) for r in recs} == {(0.9, 0.95)}
    assert records.read_for_scoring(path, None)[1] == 0.9


def test_torchrun_two_ranks_learns_and_saves(tiny_model, tmp_path):
    out = tmp_path / "o2"
    run_cli(torchrun(2) + ["rl.py", "--model", tiny_model, "--prompts", prompts_file(tmp_path), "--out", str(out),
                           "--save-every", "1000", "--dump-every", "1", *LEARN])
    assert_learned(out)
    assert common.load_model(str(out)) is not None and (out / "state").is_dir()
    # the first rollout does not depend on the number of ranks (sampling noise is keyed by global sample
    # index), and the sampler's log-probs match the trainer's π_old forward
    one = tmp_path / "o1"
    rl.main(["--model", tiny_model, "--prompts", prompts_file(tmp_path), "--out", str(one), "--save-every", "1000",
             "--dump-every", "1", "--stop-at", "1", *LEARN])
    def rollout(d):
        recs = [json.loads(line) for line in open(d / "rollouts" / "step_00001.jsonl")]
        return sorted((r["id"], r["sample"], r["completion"]) for r in recs)
    assert rollout(one) == rollout(out)
    assert metrics(one)[0]["sampler_gap"] < 1e-5 and metrics(out)[0]["sampler_gap"] < 1e-5


def test_cli_smoke_and_bad_input(tiny_model, tmp_path):
    p = prompts_file(tmp_path)
    run_cli([sys.executable, "rl.py"] + rl_args(tiny_model, p, tmp_path / "s", "--rule", "refusal", "--max-steps", "2"))
    assert [m["step"] for m in metrics(tmp_path / "s")] == [1, 2]
    bad = run_cli([sys.executable, "rl.py"] + rl_args(tiny_model, p, tmp_path / "x", "--rule", "nope"), check=False)
    assert bad.returncode != 0 and "unknown rule" in bad.stderr and not (tmp_path / "x").exists()
    bad = run_cli([sys.executable, "rl.py"] + rl_args(tiny_model, p, tmp_path / "x", "--rule", "format",
                                                      "--train-batch", "5"), check=False)
    assert bad.returncode != 0 and "divisible" in bad.stderr and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ teaching logs, precision

def test_teaching_logs_ratio_one_reward_std_reflection_entropy(tiny_model, tmp_path):
    rl.main(rl_args(tiny_model, prompts_file(tmp_path), tmp_path / "t", "--rule", "format", "--max-steps", "2"))
    for m in metrics(tmp_path / "t"):
        assert m["ratio0"] == 1.0  # the first optimizer step of every rollout is exactly on-policy
        assert m["reward_std"] >= 0 and "reward_clipped" in m and m["sampler_gap"] < 1e-5
        assert m["kept_gap"] == 0.0  # top-p 1 and no embedding row past the tokenizer: nothing cut
        assert m["n_reflect"] >= 0 and m["ent_reflect"] >= 0


def test_top_p_and_unused_rows_are_logged_as_kept_gap_and_pi_old_stays_the_full_softmax(tmp_path, monkeypatch):
    """A policy with 13 embedding rows past its tokenizer, sampled at top-p 0.8: the sampler never draws
    those ids and draws from the nucleus, π_old is the full tempered softmax (sampler_gap ~ 0, ratio0 = 1),
    and kept_gap = mean -log C_t > 0 says how far the behaviour probability sits above π_old."""
    from transformers import AutoModelForCausalLM
    from runs.tinymodels import qwen3_config
    d = tmp_path / "padded"
    tok = build_tokenizer(d)
    cfg = qwen3_config(tok, 32, 2)
    cfg.vocab_size = len(tok) + 13
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    seen = []
    generate = engine.generate

    def spy(*a, **kw):
        outs = generate(*a, **kw)
        seen.extend(x for o in outs for x in o["completion_ids"])
        return outs

    monkeypatch.setattr(engine, "generate", spy)
    rl.main(rl_args(str(d), prompts_file(tmp_path), tmp_path / "o", "--rule", "format", "--max-steps", "1",
                    "--top-p", "0.8"))
    m = metrics(tmp_path / "o")[0]
    assert seen and max(seen) < len(tok)
    assert m["kept_gap"] > 0.05 and m["sampler_gap"] < 1e-5 and m["ratio0"] == 1.0


def test_step_metrics_by_hand():
    """reward, reward_std (population), reward_clipped, the token means and ratio0 of step_metrics, by hand;
    it computes the KL to the reference, the clipped reward and the reflection tokens itself."""
    from types import SimpleNamespace
    R = torch.tensor([0.0, 20.0, 4.0, -12.0])  # raw; reinforce++ clips it to [0, 10, 4, -10]: mean 1
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]).bool()  # (4, 3): 8 response tokens
    ent = torch.arange(12.0).view(4, 3)
    ro = {"mask": mask, "ent": ent, "logp_old": torch.zeros(4, 3), "logp_ref": torch.full((4, 3), -1.0),  # k1 = 1
          "sampler": torch.full((4, 3), 0.5), "log_kept": torch.where(mask, -0.25, -9.0),  # off the mask: ignored
          "ids": torch.zeros(4, 3, dtype=torch.long)}
    reflect = torch.zeros(4, 3, dtype=torch.bool)
    reflect[2, 1] = reflect[3, 0] = True  # entropies 7 and 9
    st = {"loss": 4.0, "clipped": 2.0, "ratio0": 8.0, "ntok0": 8.0}
    args = SimpleNamespace(epochs_per_rollout=1, train_batch=2, samples_per_prompt=2, estimator="reinforce++",
                           no_std=False, kl_estimator="k1")
    m = rl.step_metrics([{"truncated": i == 1} for i in range(4)], R, ro, st, torch.tensor(1.5), 1e-6,
                        (1.0, 1.0, 1.0, 3.0), args, lambda items, T: reflect[:, :T])
    assert m["reward"] == 3.0 and m["reward_std"] == pytest.approx(math.sqrt(140 - 9)) and m["reward_clipped"] == 1.0
    assert m["kl"] == 1.0 and m["len"] == 2.0 and m["entropy"] == pytest.approx((0 + 1 + 3 + 6 + 7 + 8 + 9 + 10) / 8)
    assert m["ent_reflect"] == 8.0 and m["n_reflect"] == 2 and m["ratio0"] == 1.0 and m["sampler_gap"] == 0.5
    assert m["clip_frac"] == 0.25 and m["truncated"] == 0.25 and m["equal_groups"] == 0 and m["grad_norm"] == 1.5
    assert m["kept_gap"] == 0.25 and m["loss"] == 2.0  # 2 optimizer steps of 2 samples: their losses sum to 4


def test_one_process_bf16_reference_kl_is_zero_at_the_first_step(tiny_model, tmp_path):
    rl.main(rl_args(tiny_model, prompts_file(tmp_path), tmp_path / "b", "--rule", "format", "--max-steps", "1",
                    "--dtype", "bf16"))
    assert metrics(tmp_path / "b")[0]["kl"] == 0.0


def test_dropout_is_disabled_so_the_first_ratio_is_one(tmp_path):
    d = tmp_path / "drop"
    tok = build_tokenizer(d)
    model = build_model(d, tok)
    model.config.attention_dropout = 0.1
    model.save_pretrained(d)
    rl.main(rl_args(str(d), prompts_file(tmp_path), tmp_path / "o", "--rule", "format", "--max-steps", "1"))
    assert metrics(tmp_path / "o")[0]["ratio0"] == 1.0


def test_help_shows_groups_and_defaults():
    p = run_cli([sys.executable, "rl.py", "--help"])
    for group in ("1. rollout", "2. reward", "5. PPO update", "optimizer", "memory", "ablations (defaults = the paper's run)"):
        assert group in p.stdout, group
    assert "(default: 5e-07)" in p.stdout and "(default: reinforce++)" in p.stdout


def test_ref_offload_moves_the_reference_once_per_phase(tiny_model, tmp_path, monkeypatch):
    moves = []
    real_to = common.Policy.to

    def counting_to(self, *a, **k):
        if not self.training:  # the frozen reference (the policy trains)
            moves.append(a[0] if a else k.get("device"))
        return real_to(self, *a, **k)

    monkeypatch.setattr(common.Policy, "to", counting_to)
    rl.main(rl_args(tiny_model, prompts_file(tmp_path), tmp_path / "r", "--rule", "format", "--max-steps", "2",
                    "--ref-offload", "--micro-batch-size", "2"))
    assert len(moves) == 1 + 2 * 2  # parked once, then there and back once per step (8 micro-batches each)


def test_pad_right_lists_and_tensors():
    """common.pad_right, the one padding helper: values on the left, `value` after, mask of real entries."""
    ids, mask = common.pad_right([[5, 6, 7], [8]], value=-1)
    assert ids.tolist() == [[5, 6, 7], [8, -1, -1]] and ids.dtype == torch.long
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    x, m = common.pad_right([torch.tensor([0.5, 0.25]), torch.tensor([1.0])], length=4)
    assert x.dtype == torch.float32 and x.tolist() == [[0.5, 0.25, 0, 0], [1.0, 0, 0, 0]] and m.sum().item() == 3
    f, _ = common.pad_right([[0.1, 0.2], []], length=3, dtype=torch.float32)
    assert f.dtype == torch.float32 and f[1].tolist() == [0, 0, 0]
