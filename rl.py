"""REINFORCE++ on the FSDP2 loop, rewarded by a reward model, with rollouts from the policy itself.

One step (DESIGN §3, as OpenRLHF implements REINFORCE++, which the paper trains with):
  1. rollout: --rollout-batch prompts × n = --samples-per-prompt samples y ~ π_θ(·|x) at --temperature
  2. reward:  R = RM(x, y) (raw logit, reward.py) + Σ_k w_k rule_k(y), clipped to [-10, 10]
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
     loss does not depend on the micro-batch split or the number of ranks.

Ablation arms (--estimator): reinforce++-baseline (R minus the group mean, then global whitening),
grpo (group z-score, no whitening), rloo (leave-one-out baseline, no whitening). --kl-in loss moves
the KL out of the reward into the loss (β·k_t, recomputed from the current policy; k3 is the usual
choice there).

Defaults reproduce the paper's run (STAR-1 prompts, REINFORCE++, k1 KL in the reward, clip 0.2,
AdamW lr 5e-7, cosine with 3% warmup, 500 steps). Where the paper is silent, OpenRLHF's defaults:
  1. β = 1e-3 (init_kl_coef 0.01 is OpenRLHF's CLI default; its REINFORCE++ examples use 1e-4..1e-3)
  2. --rollout-batch 32 prompts × 8 samples, --train-batch 128 (so 2 optimizer steps per rollout),
     1 epoch per rollout, temperature 1.0, top-p 1.0, max 4096 new tokens, γ = 1, grad clip 1.0
  3. the reward model sees reasoning + answer (--score-on full)

Rollouts. Exactly on-policy, no inference server: engine.generation_view(policy) all-gathers the
FSDP2 shards once per rollout and decodes through a plain module whose parameters alias the unsharded
bf16 weights (no second copy), then engine.generate runs the static-KV-cache decoder (CUDA graphs,
finished rows dropped) with no collective inside the decode loop: each rank samples its own prompts at
its own pace, and the ranks meet after the rollout. Sampling noise is a hash of (seed + step, global
sample index, token index), so a rollout does not depend on the number of ranks. Every step logs
sampler_gap = mean |log π_sampler − log π_old| over response tokens (the sampler's numerical gap to
the trainer's forward; 0 up to rounding when both run in the same precision).

Commands:
  python rl.py --model out/sft --prompts rows.jsonl --out out/rl --rule refusal --max-steps 2
  torchrun --nproc_per_node 8 rl.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \\
      --prompts ../shared/data/star1.json --reward-model Skywork/Skywork-Reward-V2-Llama-3.1-8B \\
      --out out/rl-7b --grad-checkpointing --max-new-tokens 4096
"""
import argparse
import os
import time

import torch

from common import (DataError, Logger, UsageError, all_reduce, build_optimizer, build_policy, cosine_lr, die, finish,
                    gather_objects, init_dist, load_pairs, load_state, load_tokenizer, pick_dtype, positions_from_mask,
                    print0, read_table, render_prompt, save_hf, save_state, seed_everything, split_reasoning,
                    stop_token_ids, write_json, append_jsonl)
import engine

ESTIMATORS = ("reinforce++", "reinforce++-baseline", "grpo", "rloo")


# ------------------------------------------------------------------------------------------------
# The math, as pure functions (tests/test_rl.py checks each against hand-computed values)

def kl_estimate(logp, ref_logp, kind="k1"):
    """Per-token KL(π || π_ref) estimators with d = logp - ref_logp (Schulman's k1, k2, k3),
    d clamped to [-10, 10]. k1 = d (unbiased, can be negative), k2 = d²/2, k3 = exp(-d) - 1 + d."""
    d = (logp - ref_logp).clamp(-10, 10)
    if kind == "k1":
        return d
    if kind == "k2":
        return d.square() / 2
    if kind == "k3":
        return torch.exp(-d) - 1 + d
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3)")


def compute_advantages(rewards, logp_old, logp_ref, mask, *, estimator="reinforce++", kl_coef=1e-3,
                       kl_estimator="k1", kl_in="reward", group_size=1, gamma=1.0):
    """rewards (B,); logp_old, logp_ref (B, T); mask (B, T) bool, response tokens contiguous from the
    left; the group_size samples of one prompt are consecutive rows. Returns advantages (B, T), 0 off
    the mask. Whitening (reinforce++, reinforce++-baseline) is over every response token on every rank."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r} ({', '.join(ESTIMATORS)})")
    R = rewards.float().clamp(-10, 10)  # (B,)
    if estimator != "reinforce++":
        g = R.view(-1, group_size)  # (B / n, n)
        if estimator == "reinforce++-baseline":
            g = g - g.mean(1, keepdim=True)
        elif estimator == "grpo":
            g = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-9)
        else:  # rloo: baseline = mean of the other n - 1 rewards of the group
            g = g - (g.sum(1, keepdim=True) - g) / (group_size - 1)
        R = g.reshape(-1)
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
        s = all_reduce(torch.stack([G.sum(), m.sum()]))
        mean = s[0] / s[1]
        var = all_reduce(((G - mean).square() * m).sum()) / s[1]  # population variance
        G = (G - mean) * torch.rsqrt(var.clamp(min=1e-8)) * m
    return G


def policy_loss(logp, logp_old, adv, mask, *, eps_low=0.2, eps_high=0.2, dual_clip=None):
    """PPO-clip, summed over response tokens (the caller divides by the step's global token count).
    Returns (loss, stats) with stats: clip_frac, n_clipped, n_tokens, ratio_mean (detached)."""
    m = mask.float()
    ratio = torch.exp((logp - logp_old).clamp(-20, 20))  # (B, T) ρ
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    obj = torch.min(surr1, surr2)
    if dual_clip is not None:  # for A < 0 the objective never goes below c·A
        obj = torch.where(adv < 0, torch.max(obj, dual_clip * adv), obj)
    loss = -(obj * m).sum()
    with torch.no_grad():
        clipped = ((surr2 < surr1).float() * m).sum()
        n = m.sum()
        stats = {"clip_frac": clipped / n.clamp(min=1), "n_clipped": clipped, "n_tokens": n,
                 "ratio_mean": (ratio * m).sum() / n.clamp(min=1)}
    return loss, stats


# ------------------------------------------------------------------------------------------------
# Rollout tensors: left-padded prompts, right-padded completions, so every completion starts at
# column P and its log-probs are the slice [P-1, P-1+T) of the shifted forward.

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


def pad_stack(rows, T):
    """List of 1-D tensors -> (B, T), zero padded on the right."""
    out = torch.zeros(len(rows), T, dtype=rows[0].dtype, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def get_args(argv=None):
    p = argparse.ArgumentParser(description="REINFORCE++ (and baseline / GRPO / RLOO arms) on FSDP2.")
    p.add_argument("--model", required=True, help="hub id or local dir of the initial policy (and reference)")
    p.add_argument("--prompts", required=True, help="prompts: hub id (id[:config]:split) or .jsonl/.json/.csv/.parquet")
    p.add_argument("--out", required=True, help="output dir: HF checkpoint, args.json, metrics.jsonl, state/, rollouts/")
    p.add_argument("--prompt-field", default=None, help="column holding the prompt (default: detected)")
    p.add_argument("--gold-field", default=None, help="column holding the gold answer for --rule math")
    p.add_argument("--reward-model", default=None, help="sequence-classifier RM (hub id or dir); raw logit reward")
    p.add_argument("--rule", default=None, help="rule rewards added to the RM logit, e.g. refusal or math:1,format:0.1")
    p.add_argument("--score-on", default="full", choices=["full", "answer"], help="what the RM sees")
    p.add_argument("--rm-quant", default=None, choices=["8bit", "4bit"], help="load the RM quantized (CUDA)")
    p.add_argument("--rm-batch-size", type=int, default=8, help="RM scoring batch size")
    p.add_argument("--max-steps", type=int, default=500, help="RL steps (rollout + update); the LR schedule spans them")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step (resume later with --resume)")
    p.add_argument("--rollout-batch", type=int, default=32, help="prompts per step (global)")
    p.add_argument("--samples-per-prompt", type=int, default=8, help="n samples per prompt (a group)")
    p.add_argument("--train-batch", type=int, default=128, help="samples per optimizer step (global)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="samples per forward on each rank")
    p.add_argument("--epochs-per-rollout", type=int, default=1, help="PPO passes over each rollout")
    p.add_argument("--lr", type=float, default=5e-7, help="peak learning rate")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warmup, fraction of --max-steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW betas")
    p.add_argument("--optim", default="adamw", choices=["adamw", "adamw8bit"], help="optimizer")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (after the reduction)")
    p.add_argument("--estimator", default="reinforce++", choices=ESTIMATORS, help="advantage estimator")
    p.add_argument("--kl-coef", type=float, default=1e-3, help="β, weight of the KL to the reference")
    p.add_argument("--kl-estimator", default="k1", choices=["k1", "k2", "k3"], help="per-token KL estimator")
    p.add_argument("--kl-in", default="reward", choices=["reward", "loss"], help="fold the KL into the reward or the loss")
    p.add_argument("--gamma", type=float, default=1.0, help="discount γ of the returns")
    p.add_argument("--eps-clip", type=float, default=0.2, help="PPO clip ε (low and high)")
    p.add_argument("--eps-clip-high", type=float, default=None, help="clip-higher: ε_high (default --eps-clip)")
    p.add_argument("--dual-clip", type=float, default=None, help="dual-clip constant c > 1 (off by default)")
    p.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus weight (0: log only)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="rollout length limit")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (also used for π_old/π)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--gen-batch-size", type=int, default=64, help="sequences per sampler batch on each rank")
    p.add_argument("--max-kl", type=float, default=10.0, help="stop when the mean KL to the reference exceeds this")
    p.add_argument("--ref-offload", action="store_true", help="keep the frozen reference model on the CPU")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per layer")
    p.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPU offload of the policy")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="compute dtype (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed (sampling uses seed + rank + step)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--dump-every", type=int, default=10, help="write the rollouts as generation records every N steps")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    p.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to this wandb project")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    import reward as rw

    # --------------------------------------------------------------------------- compute init
    d = init_dist()
    seed_everything(args.seed)
    dtype = pick_dtype(args.dtype, d.device)
    n = args.samples_per_prompt
    steps_per_rollout = args.rollout_batch * n // args.train_batch
    if (args.rollout_batch % d.world or (args.rollout_batch * n) % args.train_batch or args.train_batch % d.world
            or steps_per_rollout < 1):
        raise UsageError(f"need --rollout-batch ({args.rollout_batch}) divisible by the world size ({d.world}), "
                         f"--rollout-batch × --samples-per-prompt ({args.rollout_batch * n}) divisible by "
                         f"--train-batch ({args.train_batch}), and --train-batch divisible by the world size")
    if args.estimator in ("grpo", "rloo", "reinforce++-baseline") and n < 2:
        raise UsageError(f"--estimator {args.estimator} needs --samples-per-prompt >= 2")
    if not args.reward_model and not args.rule:
        raise UsageError("give a reward: --reward-model and/or --rule")
    rules = rw.RuleReward(args.rule) if args.rule else None

    # --------------------------------------------------------------------------- data (validated first)
    tok = load_tokenizer(args.model, args.trust_remote_code)
    rows = load_pairs(args.prompts, args.prompt_field, need_response=False)
    gold_field = args.gold_field or ("answer" if rules and any(r == "math" for r, _ in rules.rules) else None)
    raw = None
    if gold_field:
        raw = read_table(args.prompts)
        for r in rows:
            if gold_field not in raw[r["row"] - 1]:
                raise DataError(f"{args.prompts}: row {r['row']}: missing field '{gold_field}' (needed by --rule math)")
    for r in rows:
        r["prompt_ids"] = render_prompt(tok, r["prompt"])
        r["gold"] = str(raw[r["row"] - 1][gold_field]) if raw else None
    if len(rows) < args.rollout_batch:
        raise DataError(f"{args.prompts}: {len(rows)} prompts, fewer than --rollout-batch {args.rollout_batch}")

    # --------------------------------------------------------------------------- models
    policy, export_dtype = build_policy(args.model, d, dtype, args.grad_checkpointing, args.cpu_offload,
                                        args.trust_remote_code)
    ref = None
    if args.kl_coef > 0:  # frozen reference: no master weights needed, compute dtype directly
        ref, _ = build_policy(args.model, d, dtype, cpu_offload=args.ref_offload and d.world > 1,
                              trust_remote_code=args.trust_remote_code, master_dtype=dtype)
        ref.eval().requires_grad_(False)
        if args.ref_offload and d.world == 1:
            ref.to("cpu")
    rm = rw.RewardModel(args.reward_model, d.device, batch_size=args.rm_batch_size, quant=args.rm_quant,
                        trust_remote_code=args.trust_remote_code) if args.reward_model else None
    opt = build_optimizer(policy.parameters(), args.optim, args.lr, tuple(args.betas), args.weight_decay, d.device)
    warmup = max(1, round(args.warmup_ratio * args.max_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.max_steps, warmup))
    autocast = torch.autocast(d.device.type, dtype=dtype, enabled=(d.world == 1 and dtype != torch.float32))
    stops, pad_id = stop_token_ids(tok, policy.hf), tok.pad_token_id

    step = load_state(args.out, policy, opt, sched) if args.resume else 0
    if d.rank == 0:
        os.makedirs(os.path.join(args.out, "rollouts"), exist_ok=True)
        write_json(os.path.join(args.out, "args.json"), vars(args))
    log = Logger(args.out, args.max_steps, args.wandb, vars(args))
    stop = min(args.max_steps, args.stop_at or args.max_steps)
    print0(f"rl: {len(rows)} prompts, {args.rollout_batch}x{n} samples/step, {steps_per_rollout} optimizer "
           f"steps/rollout, world {d.world}, dtype {dtype}, estimator {args.estimator}")

    # --------------------------------------------------------------------------- loop
    while step < stop:
        t0 = time.time()
        # 1. rollout: this rank's prompts, each repeated n times (a group = n consecutive rows)
        epoch, k = divmod(step, len(rows) // args.rollout_batch)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        batch = [rows[i] for i in order[k * args.rollout_batch:(k + 1) * args.rollout_batch]]
        mine = [r for r in batch[d.rank::d.world] for _ in range(n)]
        sample_ids = [(d.rank + j * d.world) * n + s for j in range(len(mine) // n) for s in range(n)]  # global
        with engine.generation_view(policy, dtype) as gen_model:
            outs = engine.generate(gen_model, [r["prompt_ids"] for r in mine], max_new_tokens=args.max_new_tokens,
                                   stop_ids=stops, pad_id=pad_id, temperature=args.temperature, top_p=args.top_p,
                                   batch_size=args.gen_batch_size, seed=args.seed + 100_003 * step, row_ids=sample_ids)
        t_gen = time.time() - t0
        items = []
        for r, o in zip(mine, outs):
            ids = o["completion_ids"] or [pad_id]  # an empty completion still gets one (masked) slot
            text = tok.decode(ids[:-1] if o["finished"] else ids, skip_special_tokens=False)
            items.append({"prompt_ids": r["prompt_ids"], "completion_ids": ids, "prompt": r["prompt"],
                          "id": r["id"], "gold": r["gold"], "completion": text, "finished": o["finished"],
                          "truncated": o["truncated"], "n_tokens": len(o["completion_ids"])})

        # 2. rewards: RM raw logit + weighted rules, on this rank's samples
        R = torch.zeros(len(items), device=d.device)
        if rm is not None:
            R += rm.score([it["prompt"] for it in items], [it["completion"] for it in items], args.score_on).to(d.device)
        if rules is not None:
            R += torch.tensor([rules(it["completion"], it["gold"]) for it in items], device=d.device)
        if not torch.isfinite(all_reduce(R.sum().clone())):
            raise RuntimeError(f"step {step + 1}: non-finite reward; stopping without writing a checkpoint")

        # 3. π_old and π_ref log-probs, recomputed by the trainer (same temperature as the sampler)
        t1 = time.time()
        T = max(len(it["completion_ids"]) for it in items)
        old, refl, ents, masks = [], [], [], []
        if args.ref_offload and d.world == 1 and ref is not None:
            ref.to(d.device)  # once per phase, not per micro-batch
        with torch.no_grad(), autocast:
            for j in range(0, len(items), args.micro_batch_size):
                mb = items[j:j + args.micro_batch_size]
                lp, ent, m = response_logprobs(policy, mb, pad_id, args.temperature, d.device)
                old.append(lp), ents.append(ent), masks.append(m)
                if ref is not None:
                    refl.append(response_logprobs(ref, mb, pad_id, args.temperature, d.device)[0])
        if args.ref_offload and d.world == 1 and ref is not None:
            ref.to("cpu")
        logp_old = pad_stack([r for x in old for r in x], T)  # (B, T)
        mask = pad_stack([r for x in masks for r in x], T)  # (B, T) bool
        ent = pad_stack([r for x in ents for r in x], T)
        logp_ref = pad_stack([r for x in refl for r in x], T) if ref is not None else logp_old
        logp_sampler = pad_stack([torch.tensor(o["logp"] or [0.0], device=d.device) for o in outs], T)
        t_ref = time.time() - t1

        # 4. advantages (whitening all-reduced across ranks)
        adv = compute_advantages(R, logp_old, logp_ref, mask, estimator=args.estimator, kl_coef=args.kl_coef,
                                 kl_estimator=args.kl_estimator, kl_in=args.kl_in, group_size=n, gamma=args.gamma)
        kl = kl_estimate(logp_old, logp_ref, args.kl_estimator)

        # 5. PPO-clip updates: each optimizer step takes train_batch / world of this rank's samples
        t2 = time.time()
        share = args.train_batch // d.world
        loss_sum = clipped = n_upd = 0.0
        gnorm = torch.zeros(())
        for ep in range(args.epochs_per_rollout):
            perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed + 7919 * step + ep))
            for s in range(steps_per_rollout):
                idx = perm[s * share:(s + 1) * share].tolist()
                n_tok = all_reduce(mask[idx].sum().float())
                for j in range(0, len(idx), args.micro_batch_size):
                    mb = idx[j:j + args.micro_batch_size]
                    with autocast:
                        lp, e, m = response_logprobs(policy, [items[i] for i in mb], pad_id, args.temperature, d.device)
                    Tm = m.shape[1]
                    loss, st = policy_loss(lp, logp_old[mb, :Tm], adv[mb, :Tm], m, eps_low=args.eps_clip,
                                           eps_high=args.eps_clip_high or args.eps_clip, dual_clip=args.dual_clip)
                    if args.kl_in == "loss" and ref is not None:
                        loss = loss + args.kl_coef * (kl_estimate(lp, logp_ref[mb, :Tm], args.kl_estimator) * m).sum()
                    if args.entropy_coef:
                        loss = loss - args.entropy_coef * (e * m).sum()
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"step {step + 1}: non-finite loss; stopping without writing a checkpoint")
                    # FSDP averages gradients over ranks; × world makes it the global token mean
                    (loss * d.world / n_tok).backward()
                    loss_sum += loss.item()
                    clipped += st["n_clipped"].item()
                gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.clip)
                gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
                opt.step()
                opt.zero_grad(set_to_none=True)
                n_upd += 1
        lr = sched.get_last_lr()[0]
        sched.step()
        step += 1
        t_upd = time.time() - t2

        # 6. log: token-weighted means over every rank's response tokens
        mf = mask.float()
        sums = all_reduce(torch.tensor([R.sum().item(), len(items), (kl * mf).sum().item(), (ent * mf).sum().item(),
                                        mf.sum().item(), clipped, loss_sum, sum(it["truncated"] for it in items),
                                        float(_equal_groups(R, n)), ((logp_sampler - logp_old).abs() * mf).sum().item()],
                                       device=d.device))
        Rsum, B, klsum, entsum, ntok, nclip, lsum, ntrunc, neq, gapsum = sums.tolist()
        ent_all = torch.tensor(gather_objects(ent[mask].float().cpu()[:20000].tolist()))
        q = torch.quantile(ent_all, torch.tensor([0.1, 0.5, 0.9])).tolist() if len(ent_all) else [0.0] * 3
        dt = time.time() - t0
        metrics = {"reward": Rsum / B, "kl": klsum / ntok, "entropy": entsum / ntok, "len": ntok / B,
                   "clip_frac": nclip / (ntok * args.epochs_per_rollout), "gen tok/s": ntok / t_gen,
                   "train tok/s": ntok * args.epochs_per_rollout / t_upd, "dt": dt,
                   "loss": lsum / (ntok * args.epochs_per_rollout), "grad_norm": gnorm.item(), "lr": lr,
                   "entropy_p10": q[0], "entropy_p50": q[1], "entropy_p90": q[2], "truncated": ntrunc / B,
                   "equal_groups": int(neq), "sampler_gap": gapsum / ntok, "t_gen": t_gen, "t_ref": t_ref, "t_update": t_upd}
        log.log(step, metrics)
        if metrics["kl"] > args.max_kl:
            raise RuntimeError(f"step {step}: mean KL {metrics['kl']:.3g} > --max-kl {args.max_kl}; stopping")
        if args.dump_every and step % args.dump_every == 0:
            dump_rollouts(args.out, step, items, R, n, d.rank)
        if step % args.save_every == 0 or step == stop:
            save_state(args.out, policy, opt, sched, step)
            save_hf(policy, tok, args.out, export_dtype)
    print0(f"done: {args.out}")
    return policy


def _equal_groups(R, n):
    """Groups whose n rewards are all equal: zero advantage under the baseline estimators."""
    if n < 2:
        return 0
    g = R.view(-1, n)
    return int((g.max(1).values == g.min(1).values).sum())


def dump_rollouts(out, step, items, R, n, rank):
    """The rollouts as generation records (DESIGN §2), gathered to rank 0."""
    recs = []
    for i, it in enumerate(items):
        reasoning, answer, closed = split_reasoning(it["completion"])
        recs.append({"benchmark": "rl", "id": it["id"], "sample": i % n, "prompt": it["prompt"],
                     "completion": it["completion"], "reasoning": reasoning, "answer": answer,
                     "think_closed": closed, "truncated": it["truncated"], "num_tokens": it["n_tokens"],
                     "gold": it["gold"], "score": float(R[i]), "step": step, "rank": rank})
    recs = gather_objects(recs)
    if rank == 0:
        path = os.path.join(out, "rollouts", f"step_{step:05d}.jsonl")
        for r in recs:
            append_jsonl(path, r)


if __name__ == "__main__":
    try:
        main()
        finish()
    except UsageError as e:
        die(str(e))
