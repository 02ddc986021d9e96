"""REINFORCE++ on the FSDP2 loop, rewarded by a reward model, with rollouts from the policy itself.

One step (docs/design.md §3, as OpenRLHF implements REINFORCE++, which the paper trains with):
  1. rollout: --rollout-batch prompts × n = --samples-per-prompt samples y ~ π_θ(·|x) at --temperature
  2. reward:  R = RM(x, y) (raw logit, reward.py) + Σ_k w_k rule_k(y), clipped to [-10, 10]
              (the arms: the group baseline is subtracted from the raw R, then the result is clipped)
  3. π_old and π_ref log-probs of the sampled tokens, recomputed by forward passes through the fused
     lm_head kernel (never the sampler's numbers; never a float32 [T, V] tensor)
  4. per-token reward   r_t = -β·KL_t + 1[t = last]·R,      KL_t = k1 = log π_old(y_t) - log π_ref(y_t)
     returns            G_t = Σ_{s≥t} γ^(s-t) r_s            (γ = 1)
     advantages         A_t = (G_t - mean(G)) / sqrt(max(var(G), 1e-8))
                        mean / population variance over ALL response tokens of the rollout, all ranks
  5. PPO-clip update, --epochs-per-rollout passes in global batches of --train-batch samples:
        L(θ) = -(1/N_tok) Σ_t min(ρ_t A_t, clip(ρ_t, 1-ε_low, 1+ε_high) A_t),
        ρ_t = exp(clamp(log π_θ(y_t) - log π_old(y_t), -20, 20))
     ONE token mean over every response token of the optimizer step (N_tok all-reduced), so the
     loss does not depend on the micro-batch split or the number of ranks (--loss-agg: other means).

Ablation arms (--estimator): reinforce++-baseline (R minus the group mean, then global whitening),
grpo (group z-score, no whitening), rloo (leave-one-out baseline, no whitening); --no-std drops grpo's
division by the group std. --loss-agg replaces the token mean of step 5 by a sequence mean
(loss_weights states each formula and its source); Dr. GRPO is --estimator grpo --no-std --loss-agg
seq-mean-token-sum-norm. --kl-in loss moves the KL out of the reward into the loss (β·k_t, recomputed
from the current policy; k3 is the usual choice there). --dual-clip is off, as in OpenRLHF (verl
applies c = 3 always).

Defaults reproduce the paper's run (STAR-1 prompts, REINFORCE++, k1 KL in the reward, clip 0.2,
AdamW lr 5e-7, cosine with 3% warmup, 500 steps). Where the paper is silent, OpenRLHF's defaults:
  1. β = 1e-3 (init_kl_coef 0.01 is OpenRLHF's CLI default; its REINFORCE++ examples use 1e-4..1e-3)
  2. --rollout-batch 32 prompts × 8 samples, --train-batch 128 (so 2 optimizer steps per rollout),
     1 epoch per rollout, temperature 1.0, top-p 1.0, max 4096 new tokens, γ = 1, grad clip 1.0
  3. the reward model sees reasoning + answer (--score-on full)

Rollouts. Exactly on-policy, no inference server: engine.py decodes from a view of the policy whose
parameters alias the unsharded FSDP2 weights (engine.generation_view), with no collective inside the
decode loop; each rank samples its own prompts, and the ranks meet after the rollout. Sampling noise is a
hash of (seed + step, global sample index, token index): a rollout does not depend on the number of ranks.

π_old is the tempered softmax over every lm_head row, before top-p; the sampler draws from its top-p nucleus
K_t, renormalised. The step log has sampler_gap = mean |log π_sampler - log π_old| (the sampler's numerics) and
kept_gap = mean -log C_t (C_t: the mass of π_old it kept): docs/design.md §3, "Which distribution π_old is".

Commands:
  python rl.py --model out/sft --prompts rows.jsonl --out out/rl --rule refusal --max-steps 2
  torchrun --nproc_per_node 8 rl.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \\
      --prompts UCSC-VLAA/STAR-1 --reward-model Skywork/Skywork-Reward-V2-Llama-3.1-8B \\
      --out out/rl-7b --grad-checkpointing --max-new-tokens 4096
  # two nodes x 8 GPUs, HSDP (one replica per node by default): run on each node, --node-rank 0 / 1
  torchrun --nnodes 2 --node-rank 0 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
      rl.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --prompts UCSC-VLAA/STAR-1 \\
      --reward-model Skywork/Skywork-Reward-V2-Llama-3.1-8B --out out/rl-32b --grad-checkpointing
"""
import contextlib
import functools
import os
import time

import torch

import checkpoint
import cli
import common
import engine
import preflight
import records
import resume
import reward
import tables
from common import all_reduce, pad_right, positions_from_mask
from errors import DataError, NonFiniteError, StopRun, UsageError
from entropy import DEFAULT_WORDS, reflection_mask, word_set

ESTIMATORS = ("reinforce++", "reinforce++-baseline", "grpo", "rloo")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# ------------------------------------------------------------------------------------------------
# The math, as pure functions (tests/test_rl.py checks each against hand-computed values)

def kl_estimate(logp, ref_logp, kind="k1"):
    """Per-token KL(π || π_ref) estimators with d = logp - ref_logp (Schulman's k1, k2, k3):
    k1 = d (unbiased, can be negative), k2 = d²/2, k3 = exp(-d) - 1 + d, each estimator's OUTPUT clamped
    to [-10, 10], as OpenRLHF's openrlhf/models/utils.py compute_approx_kl (at d = -15, k3 is 10, not
    e^10 - 11 ≈ 2.2e4 from a clamped d: one extreme token cannot dominate a batch's advantages)."""
    d = logp.float() - ref_logp.float()
    if kind == "k1":
        k = d
    elif kind == "k2":
        k = d.square() / 2
    elif kind == "k3":
        k = torch.exp(-d) - 1 + d
    else:
        raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3)")
    return k.clamp(-10, 10)


def shaped_rewards(rewards, estimator="reinforce++", group_size=1, std=True):
    """The scalar reward each sample gets on its last token, (B,) -> (B,): the RAW reward minus the
    group baseline (the arms), THEN clipped to [-10, 10], as OpenRLHF's
    openrlhf/trainer/ppo_utils/experience_maker.py compute_advantages_and_returns (baseline on the raw
    rewards) followed by openrlhf/models/utils.py compute_reward (clip, --reward.clip_range -10 10).
    reinforce++: clip(R); reinforce++-baseline: clip(R - mean_group R); grpo: clip((R - mean) / (std + 1e-9))
    (unbiased std), or with std=False (--no-std, Dr. GRPO, arXiv 2503.20783) clip(R - mean); rloo:
    clip(R - mean of the other n - 1).
    A group whose n rewards are all equal gets exactly 0 under every baseline, whatever n and the values: the
    group statistics are in float64, where the sum of n equal float32 rewards is exact, so R - mean = 0
    (docs/design.md §3: why not float32), and such groups are also zeroed explicitly. Near-ties keep their
    exact z-score (1 ulp apart in a group of 2: ±0.707; grpo's |A| <= (n - 1) / sqrt(n) always, so its clip
    never binds for n < 100)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r} ({', '.join(ESTIMATORS)})")
    R = rewards.double()  # (B,)
    if estimator != "reinforce++":
        g = R.view(-1, group_size)  # (B / n, n)
        tied = g.amax(1, keepdim=True) == g.amin(1, keepdim=True)  # (B / n, 1)
        if estimator == "rloo":  # baseline = mean of the other n - 1 rewards of the group
            a = g - (g.sum(1, keepdim=True) - g) / (group_size - 1)
        else:
            a = g - g.mean(1, keepdim=True)
            if estimator == "grpo" and std:
                a = a / (g.std(1, keepdim=True) + 1e-9)
        R = a.masked_fill(tied, 0.0).reshape(-1)
    return R.clamp(-10, 10).float()


def check_gamma(gamma, estimator):
    """γ discounts reinforce++ only: the baseline arms use γ = 1 (OpenRLHF forces it for them)."""
    if gamma != 1.0 and estimator != "reinforce++":
        raise UsageError(f"--gamma {gamma}: --estimator {estimator} uses γ = 1 (as OpenRLHF forces for the arms)")


def compute_advantages(rewards, logp_old, logp_ref, mask, *, estimator="reinforce++", kl_coef=1e-3,
                       kl_estimator="k1", kl_in="reward", group_size=1, gamma=1.0, std=True):
    """rewards (B,); logp_old, logp_ref (B, T); mask (B, T) bool, response tokens contiguous from the
    left; the group_size samples of one prompt are consecutive rows. Returns advantages (B, T), 0 off
    the mask. Whitening (reinforce++, reinforce++-baseline) is over every response token on every rank,
    its sums in float64: a rollout whose returns are all equal whitens to exactly 0 (the float64 sum of
    N equal float32 values is exact; docs/design.md §3). γ: check_gamma. std: grpo's division by the group std
    (False: Dr. GRPO)."""
    check_gamma(gamma, estimator)
    R = shaped_rewards(rewards, estimator, group_size, std)  # (B,)
    m = mask.float()
    r = torch.zeros_like(m)  # (B, T) per-token rewards
    if kl_in == "reward":
        r = -kl_coef * kl_estimate(logp_old, logp_ref, kl_estimator) * m
    last = m.sum(1).long() - 1  # (B,) index of the last response token
    has = last >= 0
    r[has, last[has]] += R[has]
    if gamma == 1.0:
        G = r.flip(1).cumsum(1).flip(1)  # G_t = Σ_{s≥t} r_s
    else:
        G, run = torch.zeros_like(r), torch.zeros_like(r[:, 0])
        for t in reversed(range(r.shape[1])):
            run = r[:, t] + gamma * run
            G[:, t] = run
    G = G * m
    if estimator in ("reinforce++", "reinforce++-baseline"):  # global whitening across ranks
        G, md = G.double(), m.double()
        s = all_reduce(torch.stack([G.sum(), md.sum()]))
        mean = s[0] / s[1]
        var = all_reduce(((G - mean).square() * md).sum()) / s[1]  # population variance
        G = ((G - mean) * torch.rsqrt(var.clamp(min=1e-8)) * md).float()
    return G


def loss_weights(mask, loss_agg, n_seq, n_tok, max_len):
    """(B, T) the weight w of each response token's loss ℓ in one optimizer step: Σ w·ℓ over the step's
    micro-batches and ranks is the aggregate `loss_agg` of ℓ over the step's N = n_seq sequences y_b, with
    n_tok = Σ_b |y_b| response tokens and L = max_len (--max-new-tokens):
      token-mean               (1/n_tok) Σ_b Σ_t ℓ_bt         verl token-mean; TRL loss_type dapo (its default)
      seq-mean-token-mean      (1/N) Σ_b (1/|y_b|) Σ_t ℓ_bt   verl seq-mean-token-mean; TRL grpo (GRPO's
                                                              1/G Σ_i 1/|o_i| Σ_t, DeepSeekMath eq. 3)
      seq-mean-token-sum       (1/N) Σ_b Σ_t ℓ_bt             verl seq-mean-token-sum
      seq-mean-token-sum-norm  (1/(N·L)) Σ_b Σ_t ℓ_bt         Dr. GRPO (arXiv 2503.20783): a constant L in
                                                              place of |y_b|; TRL dr_grpo. verl's mode of this
                                                              name divides Σ_b Σ_t by L alone (its
                                                              loss_scale_factor): N times ours, one constant
    n_seq and n_tok count the WHOLE step (every rank, every micro-batch) and |y_b| and L belong to one
    sequence, so the sum does not depend on how the step is split. A sequence-mean weighs a token by
    1/|y_b| (short answers count more per token); the token-sum modes weigh a sequence by its length."""
    m = mask.float()
    if loss_agg == "token-mean":
        return m / n_tok
    if loss_agg == "seq-mean-token-mean":
        return m / (m.sum(1, keepdim=True).clamp(min=1) * n_seq)
    if loss_agg == "seq-mean-token-sum":
        return m / n_seq
    if loss_agg == "seq-mean-token-sum-norm":
        return m / (n_seq * max_len)
    raise ValueError(f"unknown loss aggregation {loss_agg!r} ({', '.join(LOSS_AGGS)})")


def policy_loss(logp, logp_old, adv, mask, *, eps_low=0.2, eps_high=0.2, dual_clip=None, weight=None):
    """PPO-clip, summed over response tokens with weights `weight` (B, T) (loss_weights; default 1 per
    response token: the caller divides). Returns (loss, stats) with stats: clip_frac, n_clipped, n_tokens,
    ratio_mean (detached, unweighted)."""
    m = mask.float()
    ratio = torch.exp((logp - logp_old).clamp(-20, 20))  # (B, T) ρ
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    obj = torch.min(surr1, surr2)
    if dual_clip is not None:  # for A < 0 the objective never goes below c·A
        obj = torch.where(adv < 0, torch.max(obj, dual_clip * adv), obj)
    loss = -(obj * (m if weight is None else weight)).sum()
    with torch.no_grad():
        clipped = ((surr2 < surr1).float() * m).sum()
        n = m.sum()
        stats = {"clip_frac": clipped / n.clamp(min=1), "n_clipped": clipped, "n_tokens": n,
                 "ratio_mean": (ratio * m).sum() / n.clamp(min=1)}
    return loss, stats


# ------------------------------------------------------------------------------------------------
# The models: the policy is common.build_policy's; the frozen reference, and no dropout in either

def build_reference(args, d, dtype):
    """The frozen π_ref (None when β = 0) and `on_device`, a context in which it is on the device: with
    --ref-offload on one process it waits on the CPU and comes to the device for each phase that reads it
    (`with on_device():`), not for each micro-batch. One process keeps it in the policy's fp32 master dtype,
    so both run the same autocast arithmetic (a bf16 copy makes the step-0 KL non-zero); FSDP2 casts both
    alike (and offloads it itself: --ref-offload is FSDP2's CPU offload there)."""
    if args.kl_coef == 0:
        return None, contextlib.nullcontext
    ref = common.build_policy(args.model, d, dtype, cpu_offload=args.ref_offload and d.world > 1,
                              trust_remote_code=args.trust_remote_code,
                              master_dtype=dtype if d.world > 1 else torch.float32,
                              replicate=common.hsdp_replicas(args.replicate, d.world))[0]
    ref.eval().requires_grad_(False)
    if not (args.ref_offload and d.world == 1):
        return ref, contextlib.nullcontext
    ref.to("cpu")

    @contextlib.contextmanager
    def on_device():
        ref.to(d.device)
        try:
            yield
        finally:
            ref.to("cpu")
    return ref, on_device


def disable_dropout(model):
    """RL needs π_old, π and π_ref to be deterministic functions of the weights (the first ratio is exactly 1):
    zero every dropout, as TRL and OpenRLHF do for their actors. Returns how many were non-zero."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            m.p, n = 0.0, n + 1
        if getattr(m, "attention_dropout", 0):
            m.attention_dropout, n = 0.0, n + 1
    cfg = getattr(getattr(model, "hf", model), "config", None)
    for k in ("attention_dropout", "hidden_dropout", "dropout"):
        if cfg is not None and getattr(cfg, k, 0):
            setattr(cfg, k, 0.0)
    return n


def build_models(args, d, dtype):
    """The policy (and its export dtype), the reference with its on_device context, the reward model (None
    without --reward-model): dropout zeroed in the policy and the reference."""
    policy, export_dtype = common.build_policy(args.model, d, dtype, args.grad_checkpointing, args.cpu_offload,
                                               args.trust_remote_code,
                                               replicate=common.hsdp_replicas(args.replicate, d.world))
    ref, ref_on_device = build_reference(args, d, dtype)
    if disable_dropout(policy) + (disable_dropout(ref) if ref is not None else 0):
        common.print0("rl: dropout set to 0 in the policy and the reference (π_old, π and π_ref must be "
                      "deterministic)")
    rm = reward.RewardModel(args.reward_model, d.device, batch_size=args.rm_batch_size, quant=args.rm_quant,
                            trust_remote_code=args.trust_remote_code) if args.reward_model else None
    common.barrier()  # every rank holds its reward model (downloads take uneven time) before the first collective
    return policy, export_dtype, ref, ref_on_device, rm


# ------------------------------------------------------------------------------------------------
# One step: 0. the prompts; 1. rollout; 2. reward; 3. π_old and π_ref; 5. the PPO-clip update
#
# Rollout tensors: left-padded prompts, right-padded completions, so every completion starts at
# column P and its log-probs are the slice [P-1, P-1+T) of the shifted forward.

def load_prompts(args, tok, rules, ctx=None):
    """Prompt rows with their rendered ids, their `thinking` (common.prompt_thinking: how a completion of the
    prompt splits into reasoning and answer) and, for --rule math, the gold answer (validated first). Prompts
    longer than --max-prompt-len, or than the model's context `ctx` minus --max-new-tokens, are dropped
    (counted). Returns (rows, n dropped, the length limit that applied)."""
    gold_field = args.gold_field or ("answer" if rules and any(r == "math" for r, _ in rules.rules) else None)
    rows = tables.load_pairs(args.prompts, args.prompt_field, need_response=False, gold_field=gold_field)
    for r in rows:
        text = common.render_prompt_text(tok, r["prompt"], args.chat_template_kwargs)
        r["prompt_ids"], r["thinking"] = tok.encode(text, add_special_tokens=False), common.prompt_thinking(text)
    limit = min(args.max_prompt_len, ctx - args.max_new_tokens) if ctx else args.max_prompt_len
    why = f"--max-prompt-len {args.max_prompt_len}" if limit == args.max_prompt_len else \
        f"{limit} tokens: the context {ctx} minus --max-new-tokens {args.max_new_tokens}"
    n_long = sum(len(r["prompt_ids"]) > limit for r in rows)
    rows = [r for r in rows if len(r["prompt_ids"]) <= limit]
    if len(rows) < args.rollout_batch:
        raise DataError(f"{args.prompts}: {len(rows)} prompts (after dropping {n_long} longer than {why}), "
                        f"fewer than --rollout-batch {args.rollout_batch}")
    return rows, n_long, why


def rollout(policy, tok, rows, step, args, d, dtype, stops):
    """1. This rank's share of the step's prompts, each sampled n times (a group = n consecutive rows),
    decoded by engine.py from an unsharded view of the policy. Returns one item dict per sample."""
    n = args.samples_per_prompt
    epoch, k = divmod(step, len(rows) // args.rollout_batch)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    batch = [rows[i] for i in order[k * args.rollout_batch:(k + 1) * args.rollout_batch]]
    mine = [r for r in batch[d.rank::d.world] for _ in range(n)]
    sample_ids = [(d.rank + j * d.world) * n + s for j in range(len(mine) // n) for s in range(n)]  # global
    with engine.generation_view(policy, dtype) as gen_model:
        outs = engine.generate(gen_model, [r["prompt_ids"] for r in mine], max_new_tokens=args.max_new_tokens,
                               stop_ids=stops, pad_id=tok.pad_token_id, temperature=args.temperature,
                               top_p=args.top_p, batch_size=args.gen_batch_size, seed=args.seed + 100_003 * step,
                               row_ids=sample_ids, vocab_size=len(tok))
    items = []
    for r, o in zip(mine, outs):
        ids = o["completion_ids"]
        text = tok.decode(ids[:-1] if o["finished"] else ids, skip_special_tokens=False)
        items.append({"prompt_ids": r["prompt_ids"], "completion_ids": ids, "sampler_logp": o["logp"],
                      "log_kept": o["log_kept"], "prompt": r["prompt"], "id": r["id"], "gold": r.get("gold"),
                      "completion": text, "thinking": r["thinking"], "finished": o["finished"],
                      "truncated": o["truncated"], "n_tokens": len(ids)})
    return items


def rewards(items, rm, rules, args, d, step):
    """2. R = RM(x, y) (the raw logit, reward.py) + Σ_k w_k rule_k(y) per sample (B,), checked finite on
    every rank before anything uses it."""
    R = torch.zeros(len(items), device=d.device)
    if rm is not None:
        R += rm.score([it["prompt"] for it in items], [it["completion"] for it in items], args.score_on,
                      thinking=[it["thinking"] for it in items]).to(d.device)
    if rules is not None:
        R += torch.tensor([rules(it["completion"], it["gold"], it["thinking"]) for it in items], device=d.device)
    common.barrier()  # ranks meet here, outside a collective: rollout lengths (and RM time) differ between ranks
    if not torch.isfinite(all_reduce(R.sum().clone())):
        raise NonFiniteError(f"step {step + 1}: non-finite reward; stopped before the update, nothing written")
    return R


def collate(items, pad_id, device):
    """items: dicts with prompt_ids, completion_ids -> ids, attn, pos (B, P+T), P, resp mask (B, T)."""
    P = max(len(it["prompt_ids"]) for it in items)
    T = max(len(it["completion_ids"]) for it in items)
    B = len(items)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    for i, it in enumerate(items):
        p, c = it["prompt_ids"], it["completion_ids"]
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[i, P - len(p):P + len(c)] = 1
    resp = attn[:, P:].bool()  # (B, T) response tokens, contiguous from the left (mask, not token values)
    return ids.to(device), attn.to(device), positions_from_mask(attn).to(device), P, resp.to(device)


def response_logprobs(model, items, pad_id, temperature, device):
    """log π(y_t) and H_t of each response token -> (logp, ent, mask), each (B, T)."""
    ids, attn, pos, P, resp = collate(items, pad_id, device)
    tgt = torch.cat([ids[:, 1:], ids[:, :1]], 1)  # (B, P+T) targets[t] = ids[t+1]; last column unused
    logp, ent = model(ids, attention_mask=attn, position_ids=pos, targets=tgt, temperature=temperature)
    T = resp.shape[1]
    return logp[:, P - 1:P - 1 + T], ent[:, P - 1:P - 1 + T], resp


def score_rollout(policy, ref, items, args, d, autocast, pad_id):
    """3. π_old and π_ref log-probs (and π_old's entropy) of every sampled token, recomputed by the
    trainer in eval mode at the sampling temperature. Returns (B, T) tensors: logp_old, logp_ref, ent,
    mask, sampler (the sampler's own log-probs), log_kept (log C_t, the sampler's kept mass), ids (the
    completion tokens). The reference is on the device (build_reference's on_device)."""
    T = max(len(it["completion_ids"]) for it in items)
    old, refl, ents, masks = [], [], [], []
    policy.eval()
    with torch.no_grad(), autocast:
        for j in range(0, len(items), args.micro_batch_size):
            mb = items[j:j + args.micro_batch_size]
            lp, ent, m = response_logprobs(policy, mb, pad_id, args.temperature, d.device)
            old.append(lp), ents.append(ent), masks.append(m)
            if ref is not None:
                refl.append(response_logprobs(ref, mb, pad_id, args.temperature, d.device)[0])
    policy.train()
    stack = lambda xs: pad_right([r for x in xs for r in x], length=T)[0]  # noqa: E731 -- micro-batches -> (B, T)
    ro = {"logp_old": stack(old), "ent": stack(ents), "mask": stack(masks)}
    ro["logp_ref"] = stack(refl) if ref is not None else ro["logp_old"]
    per_item = lambda key, **kw: pad_right([it[key] for it in items], length=T, device=d.device, **kw)[0]  # noqa: E731
    ro["sampler"] = per_item("sampler_logp", dtype=torch.float32)
    ro["log_kept"] = per_item("log_kept", dtype=torch.float32)
    ro["ids"] = per_item("completion_ids")
    return ro


def ppo_update(policy, opt, items, ro, adv, args, d, autocast, step, pad_id):
    """5. --epochs-per-rollout passes; each optimizer step takes train_batch / world of this rank's samples:
        loss = Σ_t w_t·(-min(ρ_t A_t, clip(ρ_t, 1-ε_low, 1+ε_high) A_t) [+ β k_t] [- c H_t]),  response tokens
    w = loss_weights(--loss-agg) with the step's global counts (N_tok all-reduced), backpropagated as
    loss · world (FSDP averages gradients over ranks: the × world makes the result ONE aggregate over the
    global step). Returns the sums the log needs."""
    mask, share = ro["mask"], args.train_batch // d.world
    steps_per_rollout = len(items) * d.world // args.train_batch
    st_sum = {"loss": 0.0, "clipped": 0.0, "ratio0": 0.0, "ntok0": 0.0}
    gnorm = torch.zeros(())
    for ep in range(args.epochs_per_rollout):
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed + 7919 * step + ep))
        for s in range(steps_per_rollout):
            idx = perm[s * share:(s + 1) * share].tolist()
            n_tok = all_reduce(mask[idx].sum().float())
            step_loss = 0.0  # this rank's share of the step's aggregate
            for j in range(0, len(idx), args.micro_batch_size):
                mb = idx[j:j + args.micro_batch_size]
                with autocast:
                    lp, e, m = response_logprobs(policy, [items[i] for i in mb], pad_id, args.temperature, d.device)
                Tm = m.shape[1]
                w = loss_weights(m, args.loss_agg, args.train_batch, n_tok, args.max_new_tokens)  # (b, Tm)
                loss, st = policy_loss(lp, ro["logp_old"][mb, :Tm], adv[mb, :Tm], m, eps_low=args.eps_clip,
                                       eps_high=args.eps_clip_high or args.eps_clip, dual_clip=args.dual_clip,
                                       weight=w)
                if args.kl_in == "loss" and args.kl_coef > 0:
                    loss = loss + args.kl_coef * (kl_estimate(lp, ro["logp_ref"][mb, :Tm], args.kl_estimator) * w).sum()
                if args.entropy_coef:
                    loss = loss - args.entropy_coef * (e * w).sum()
                (loss * d.world).backward()
                step_loss += loss.item()
                st_sum["loss"] += loss.item()
                st_sum["clipped"] += st["n_clipped"].item()
                if ep == 0 and s == 0:  # before any update from this rollout: ρ must be exactly 1
                    st_sum["ratio0"] += (st["ratio_mean"] * st["n_tokens"]).item()
                    st_sum["ntok0"] += st["n_tokens"].item()
            gnorm = common.clip_grad_norm(policy, args.clip)
            checkpoint.check_finite(step + 1, d.device, loss=step_loss, grad_norm=gnorm)  # before the update
            opt.step()
            opt.zero_grad(set_to_none=True)
    return st_sum, gnorm


# ------------------------------------------------------------------------------------------------
# 6. The step's log

# the step's line on the console; metrics.jsonl gets every key of step_metrics
CONSOLE = ("reward", "kl", "entropy", "len", "ent_reflect", "clip_frac", "loss", "grad_norm", "lr", "gen tok/s", "dt")


def step_metrics(items, R, ro, st, gnorm, lr, times, args, reflections):
    """6. The step's log: token-weighted means over every rank's response tokens, from ONE all-reduce of the
    named sums below, which include the values only the log reads: the KL to the reference, the clipped
    reward (what the last token gets) and the tokens at reflection words (reflections(items, T=T), entropy.py's
    reflection_mask). loss is the mean over the rollout's optimizer steps of each step's --loss-agg aggregate."""
    n, epochs = args.samples_per_prompt, args.epochs_per_rollout
    m = ro["mask"].float()                                                       # (B, T)
    kl = kl_estimate(ro["logp_old"], ro["logp_ref"], args.kl_estimator)          # (B, T)
    R_clipped = shaped_rewards(R, args.estimator, n, not args.no_std)            # (B,)
    refl = reflections(items, T=ro["ids"].shape[1]).to(R.device).float()         # (B, T)
    sums = {"R": R.sum(), "R2": R.square().sum(), "R_clipped": R_clipped.sum(), "samples": len(items),
            "kl": (kl * m).sum(), "ent": (ro["ent"] * m).sum(), "tokens": m.sum(), "clipped": st["clipped"],
            "loss": st["loss"], "truncated": sum(it["truncated"] for it in items),
            "equal_groups": equal_groups(R, n),
            "gap": ((ro["sampler"] - ro["logp_old"]).abs() * m).sum(), "ratio0": st["ratio0"], "tokens0": st["ntok0"],
            "ent_refl": (ro["ent"] * refl).sum(), "refl": refl.sum(), "cut": -(ro["log_kept"] * m).sum()}
    s = dict(zip(sums, all_reduce(torch.tensor([float(v) for v in sums.values()], dtype=torch.float64,
                                               device=R.device)).tolist()))
    ent_all = torch.tensor(common.gather_objects(ro["ent"][ro["mask"]].float().cpu()[:20000].tolist()))
    q = torch.quantile(ent_all, torch.tensor([0.1, 0.5, 0.9])).tolist() if len(ent_all) else [0.0] * 3
    B, ntok, (t_gen, t_ref, t_upd, dt) = s["samples"], s["tokens"], times
    return {"reward": s["R"] / B, "reward_std": max(s["R2"] / B - (s["R"] / B) ** 2, 0.0) ** 0.5,
            "reward_clipped": s["R_clipped"] / B, "kl": s["kl"] / ntok, "entropy": s["ent"] / ntok, "len": ntok / B,
            "ent_reflect": s["ent_refl"] / max(s["refl"], 1), "n_reflect": int(s["refl"]),
            "ratio0": s["ratio0"] / max(s["tokens0"], 1), "clip_frac": s["clipped"] / (ntok * epochs),
            "loss": s["loss"] / (B / args.train_batch * epochs), "grad_norm": gnorm.item(), "lr": lr,
            "sampler_gap": s["gap"] / ntok, "kept_gap": s["cut"] / ntok,
            "gen tok/s": ntok / t_gen, "train tok/s": ntok * epochs / t_upd,
            "entropy_p10": q[0], "entropy_p50": q[1], "entropy_p90": q[2], "truncated": s["truncated"] / B,
            "equal_groups": int(s["equal_groups"]), "dt": dt, "t_gen": t_gen, "t_ref": t_ref, "t_update": t_upd}


def equal_groups(R, n):
    """Groups whose n rewards are all equal: zero advantage under the baseline estimators."""
    if n < 2:
        return 0
    g = R.view(-1, n)
    return int((g.max(1).values == g.min(1).values).sum())


# ------------------------------------------------------------------------------------------------
# The command line

def step_flags(p):
    """The flags of the step's phases, one group per step of the module docstring."""
    a = p.add_argument_group("1. rollout").add_argument
    a("--rollout-batch", type=int, default=32, help="prompts per step (global)")
    a("--samples-per-prompt", type=int, default=8, help="n samples per prompt (a group)")
    a("--max-new-tokens", type=int, default=4096, help="rollout length limit (less than the model's context)")
    a("--temperature", type=float, default=1.0, help="sampling temperature (also used for π_old/π)")
    a("--top-p", type=float, default=1.0,
      help="nucleus sampling (π_old and the ratio stay the full tempered softmax; kept_gap logs -log C)")
    a("--gen-batch-size", type=int, default=64, help="rows decoded at once on each rank (engine.py)")
    a("--max-prompt-len", type=int, default=1024,
      help="drop prompts longer than this many tokens (or than the model's context minus --max-new-tokens), "
      "counted in the start line (OpenRLHF's default)")
    a = p.add_argument_group("2. reward").add_argument
    a("--reward-model", default=None, help="sequence-classifier RM (hub id or dir); raw logit reward")
    a("--rule", default=None, help="rule rewards added to the RM logit, e.g. refusal or math:1,format:0.1")
    a("--score-on", default="full", choices=["full", "answer"], help="what the RM sees")
    a("--rm-quant", default=None, choices=["8bit", "4bit"], help="load the RM quantized (CUDA)")
    a("--rm-batch-size", type=int, default=8, help="RM scoring batch size")
    a = p.add_argument_group("3-4. KL and advantages").add_argument
    a("--kl-coef", type=float, default=1e-3, help="β, weight of the KL to the reference (0: no reference model)")
    a("--max-kl", type=float, default=10.0, help="stop when the mean KL to the reference exceeds this")
    a = p.add_argument_group("5. PPO update").add_argument
    a("--train-batch", type=int, default=128, help="samples per optimizer step (global)")
    a("--micro-batch-size", type=int, default=4, help="samples per forward on each rank")
    a("--epochs-per-rollout", type=int, default=1, help="PPO passes over each rollout")
    a("--eps-clip", type=float, default=0.2, help="PPO clip ε (low and high)")


def training_flags(p):
    """The optimizer, memory, checkpoint and logging flags: cli.py's shared ones with rl's defaults, and rl's own."""
    cli.add_optimizer_flags(p, lr=5e-7, warmup_ratio=0.03, warmup_of="--max-steps")
    a = p.add_argument_group("memory").add_argument
    a("--ref-offload", action="store_true", help="keep the frozen reference model on the CPU")
    cli.add_memory_flags(a, offload_of="the policy")
    a = p.add_argument_group("checkpoints and logging").add_argument
    cli.add_checkpoint_flags(a, ("--dump-every", "--max-kl", "--reflection-words"), "state, metrics, rollouts", 50,
                             "every N steps save the state and the export and keep OUT/checkpoints/step-N (and at "
                             "the end)")
    a("--dump-every", type=int, default=10, help="write the rollouts as generation records every N steps")
    a("--reflection-words", default=DEFAULT_WORDS, help="words whose tokens' entropy is logged each step")
    a("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    a("--wandb", default=None, metavar="PROJECT", help="also log to this wandb project")


def get_args(argv=None):
    p = cli.ArgumentParser(description="REINFORCE++ (and baseline / GRPO / RLOO arms) on FSDP2.")
    a = p.add_argument_group("run").add_argument
    a("--model", required=True, help="hub id or local dir of the initial policy (and reference)")
    a("--prompts", required=True, help="prompts: hub id (id[:config]:split) or .jsonl/.json/.csv/.parquet")
    a("--out", required=True, help="output dir: HF checkpoint, args.json, metrics.jsonl, state/, rollouts/")
    a("--prompt-field", default=None, help="column holding the prompt (default: detected)")
    a("--chat-template-kwargs", type=cli.chat_template_kwargs, default=None, metavar="JSON",
      help='template variables for the policy\'s apply_chat_template, e.g. \'{"enable_thinking": true}\'')
    a("--gold-field", default=None, help="column holding the gold answer for --rule math")
    a("--max-steps", type=int, default=500, help="RL steps (rollout + update); the LR schedule spans them")
    a("--stop-at", type=int, default=None, help="stop after this step (resume later with --resume)")
    a("--seed", type=int, default=0, help="seed; a sample's noise is keyed by (seed + step, global sample index)")
    step_flags(p)
    training_flags(p)
    a = p.add_argument_group("ablations (defaults = the paper's run)").add_argument
    a("--estimator", default="reinforce++", choices=ESTIMATORS, help="advantage estimator")
    a("--kl-estimator", default="k1", choices=["k1", "k2", "k3"], help="per-token KL estimator")
    a("--kl-in", default="reward", choices=["reward", "loss"], help="fold the KL into the reward or the loss")
    a("--gamma", type=float, default=1.0, help="discount γ of the returns (reinforce++ only; the arms use 1)")
    a("--eps-clip-high", type=float, default=None, help="clip-higher: ε_high (default --eps-clip)")
    a("--no-std", action="store_true",
      help="grpo without the division by the group std: A = clip(R - mean_group R) (Dr. GRPO; with it use "
           "--loss-agg seq-mean-token-sum-norm)")
    a("--loss-agg", default="token-mean", choices=LOSS_AGGS,
      help="how a step's per-token losses become one number (loss_weights: formulas and sources)")
    a("--dual-clip", type=float, default=None,
      help="dual-clip constant c > 1: for A < 0 the objective never goes below c·A (off, as OpenRLHF; verl "
           "applies c = 3 always, its clip_ratio_c)")
    a("--entropy-coef", type=float, default=0.0, help="entropy bonus weight (0: log only)")
    return p.parse_args(argv)


def check_args(args, d):
    """Every flag value, then --model and --reward-model (preflight.check_model), before any weight or data is
    read (the flag is named in the message). Returns the policy's context length (None when its config does not
    say), which bounds --max-new-tokens and the prompts."""
    cli.check_min(args, "--max-steps", "--stop-at", "--rollout-batch", "--samples-per-prompt", "--train-batch",
                  "--micro-batch-size", "--epochs-per-rollout", "--max-new-tokens", "--max-prompt-len",
                  "--gen-batch-size", "--rm-batch-size", "--save-every")
    cli.check_min(args, "--dump-every", "--keep-checkpoints", lo=0)
    cli.check_sampling(args, greedy_ok=False)  # π_old and π are evaluated at the sampling temperature
    cli.check_range(args, "--kl-coef", 0)
    cli.check_range(args, "--gamma", 0, 1)
    cli.check_range(args, "--eps-clip", 0, 1, lo_open=True, hi_open=True)
    cli.check_range(args, "--eps-clip-high", 0, lo_open=True)
    cli.check_range(args, "--dual-clip", 1, lo_open=True)
    cli.check_range(args, "--entropy-coef", 0)
    cli.check_range(args, "--max-kl", 0, lo_open=True)
    n, world = args.samples_per_prompt, d.world
    if (args.rollout_batch % world or (args.rollout_batch * n) % args.train_batch or args.train_batch % world
            or args.rollout_batch * n < args.train_batch):
        raise UsageError(f"need --rollout-batch ({args.rollout_batch}) divisible by the world size ({world}), "
                         f"--rollout-batch × --samples-per-prompt ({args.rollout_batch * n}) divisible by "
                         f"--train-batch ({args.train_batch}), and --train-batch divisible by the world size")
    if args.estimator in ("grpo", "rloo", "reinforce++-baseline") and n < 2:
        raise UsageError(f"--estimator {args.estimator} needs --samples-per-prompt >= 2")
    if args.no_std and args.estimator != "grpo":
        raise UsageError(f"--no-std is grpo's (Dr. GRPO); --estimator {args.estimator} divides by no group std")
    check_gamma(args.gamma, args.estimator)
    if not args.reward_model and not args.rule:
        raise UsageError("give a reward: --reward-model and/or --rule")
    cli.check_training(args, d.device)  # --lr, --betas, ..., --optim, --resume, --wandb, --out
    cfg = preflight.check_model(args.model, "--model", trust_remote_code=args.trust_remote_code)
    if args.reward_model:
        preflight.check_model(args.reward_model, "--reward-model", "seq-cls", trust_remote_code=args.trust_remote_code)
    ctx = preflight.model_context(cfg)
    if ctx and args.max_new_tokens >= ctx:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the context of "
                         f"--model {args.model} ({ctx} tokens, its config.json)")
    return ctx


def main(argv=None):
    args = get_args(argv)

    # --------------------------------------------------------------------------- compute init
    d = common.init_dist(args.device, args.dist_timeout)
    ctx = check_args(args, d)  # the flags, then the model dirs: before any weight is read
    common.seed_everything(args.seed)
    dtype = common.pick_dtype(args.dtype, d.device)
    rules = reward.RuleReward(args.rule) if args.rule else None

    # --------------------------------------------------------------------------- data (validated first)
    tok = common.load_tokenizer(args.model, args.trust_remote_code, what="--model")
    rows, n_long, why_long = load_prompts(args, tok, rules, ctx)
    checkpoint.claim_out_dir(args.out, args.resume, args.overwrite)  # the run's lock; refuses another run's dir
    changes = resume.resume_changes(args) if args.resume else {}  # a changed flag: refused unless --allow-changes

    # --------------------------------------------------------------------------- models
    policy, export_dtype, ref, ref_on_device, rm = build_models(args, d, dtype)
    opt, sched = common.build_optimizer(policy.parameters(), args, args.max_steps)  # AdamW, warmup + cosine
    autocast = torch.autocast(d.device.type, dtype=dtype, enabled=(d.world == 1 and dtype != torch.float32))
    stops, n = common.stop_token_ids(tok, policy.hf, args.chat_template_kwargs), args.samples_per_prompt
    reflections = functools.partial(reflection_mask, words=word_set(args.reflection_words),
                                    piece=functools.lru_cache(maxsize=None)(lambda i: tok.decode([i])))

    step = checkpoint.restore(args, policy, opt, sched, changes)  # 0, or --resume's step; args.json written
    if d.rank == 0:  # from the start: rollouts/ marks OUT as an rl run's (checkpoint.claim_out_dir)
        os.makedirs(os.path.join(args.out, "rollouts"), exist_ok=True)
    log = cli.Logger(args.out, args.max_steps, args.wandb, vars(args), show=CONSOLE)
    stop = min(args.max_steps, args.stop_at or args.max_steps)
    common.print0(f"rl: {len(rows)} prompts ({n_long} dropped: longer than {why_long}), "
                  f"{args.rollout_batch}x{n} samples/step, {args.rollout_batch * n // args.train_batch}"
                  f" optimizer steps/rollout, world {d.world}, dtype {dtype}, estimator {args.estimator}")

    # --------------------------------------------------------------------------- loop
    while step < stop:
        t0 = time.time()
        items = rollout(policy, tok, rows, step, args, d, dtype, stops)  # 1. sample
        t_gen = time.time() - t0
        R = rewards(items, rm, rules, args, d, step)  # 2. RM raw logit + weighted rules
        t1 = time.time()
        with ref_on_device():
            ro = score_rollout(policy, ref, items, args, d, autocast, tok.pad_token_id)  # 3. π_old, π_ref
        t_ref = time.time() - t1
        adv = compute_advantages(R, ro["logp_old"], ro["logp_ref"], ro["mask"], estimator=args.estimator,  # 4.
                                 kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, kl_in=args.kl_in,
                                 group_size=n, gamma=args.gamma, std=not args.no_std)
        t2 = time.time()
        st, gnorm = ppo_update(policy, opt, items, ro, adv, args, d, autocast, step, tok.pad_token_id)  # 5.
        lr = sched.get_last_lr()[0]
        sched.step()
        step += 1
        metrics = step_metrics(items, R, ro, st, gnorm, lr, (t_gen, t_ref, time.time() - t2, time.time() - t0),  # 6.
                               args, reflections)
        log.log(step, metrics)
        if metrics["kl"] > args.max_kl:  # every rank holds the same all-reduced mean: all stop together
            raise StopRun(f"step {step}: mean KL to the reference {metrics['kl']:.3g} > --max-kl {args.max_kl}; "
                          f"stopped before saving step {step}: the last saved state and export are intact (lower "
                          f"--lr or raise --kl-coef, or raise --max-kl)")
        if args.dump_every and step % args.dump_every == 0:
            records.dump_rollouts(step, items, R, args, d.rank)
        checkpoint.save_step(args, policy, tok, opt, sched, export_dtype, step, stop)  # the export, then the state
    common.print0(f"done: {args.out}")
    checkpoint.release_out_dirs(args.out)
    return policy


if __name__ == "__main__":
    cli.cli_main(main)
