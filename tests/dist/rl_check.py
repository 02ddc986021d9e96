"""Run under torchrun by tests/test_rl.py (one launch, two checks), rank 0 saving both results to OUT:

1. the pure functions: each rank holds one half of a fixed batch; the advantages and the aggregated
   loss (every estimator, grpo without std, every --loss-agg) gathered from both halves;
2. rl.py steps on a FIXED rollout (RUNS: the default token mean; a sequence mean with an entropy term):
   the gradients before clipping must not depend on the world size (FSDP2 averages gradients over ranks;
   rl.py's `loss * world`, with the step's global counts in the loss weights, turns that average back
   into the global aggregate). engine.generate is replaced by a function of the prompt alone (identical
   on 1 and 2 ranks whatever the decoder's numerics), and clip_grad_norm_ by a wrapper that records
   every full gradient first. The 1-rank side calls `run` in the test process.

  torchrun --nproc_per_node 2 tests/dist/rl_check.py OUT MODEL PROMPTS RL_OUT
"""
import sys

import torch

sys.path.insert(0, ".")
import cli  # noqa: E402
import common  # noqa: E402
import rl  # noqa: E402


def batch():
    g = torch.Generator().manual_seed(0)
    B, T = 8, 7
    lengths = torch.tensor([7, 3, 5, 1, 6, 2, 7, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.randn(B, generator=g) * 3
    logp_old = -torch.rand(B, T, generator=g) * 2
    logp_ref = -torch.rand(B, T, generator=g) * 2
    logp = logp_old + 0.3 * torch.randn(B, T, generator=g)
    return rewards, logp_old, logp_ref, logp, mask


CASES = [(est, True, "token-mean") for est in rl.ESTIMATORS] + [("grpo", False, "seq-mean-token-sum-norm")] + \
    [("reinforce++", True, agg) for agg in rl.LOSS_AGGS[1:]]  # (estimator, std, loss_agg)


def loss_and_adv(rewards, logp_old, logp_ref, logp, mask, estimator, std=True, loss_agg="token-mean"):
    adv = rl.compute_advantages(rewards, logp_old, logp_ref, mask, estimator=estimator, kl_coef=0.05, group_size=2,
                                std=std)
    n_tok = common.all_reduce(mask.sum().float())
    w = rl.loss_weights(mask, loss_agg, 8, n_tok, 7)  # 8 sequences in all, at most 7 new tokens
    loss, _ = rl.policy_loss(logp, logp_old, adv, mask, weight=w)
    return adv, common.all_reduce(loss.detach().clone())


TEXTS = ["Hmm, wait.", "\n</think>\n\nNo, I cannot help.", "But let me think", "ok\n</think>\n\nSure."]


def args(model, prompts, out):
    return ["--model", model, "--prompts", prompts, "--out", out, "--rule", "format", "--max-steps", "1",
            "--rollout-batch", "4", "--samples-per-prompt", "2", "--train-batch", "8", "--micro-batch-size", "3",
            "--kl-coef", "0", "--save-every", "1000", "--dump-every", "0", "--seed", "0", "--max-new-tokens", "8"]


RUNS = [(), ("--loss-agg", "seq-mean-token-mean", "--entropy-coef", "0.01")]  # extra rl.py flags


def run(model, prompts, out, *extra):
    """rl.main on the fixed rollout; returns the pre-clip gradients (full tensors, parameter order)."""
    tok = common.load_tokenizer(model)
    eos = tok.eos_token_id

    def fixed_rollout(policy, prompt_ids, **kw):
        outs, seen = [], {}
        for p in prompt_ids:
            k = seen[tuple(p)] = seen.get(tuple(p), -1) + 1  # k-th sample of this prompt in the group
            ids = tok.encode(TEXTS[(sum(p) + k) % len(TEXTS)], add_special_tokens=False)
            fin = k % 2 == 0
            ids = ids + [eos] if fin else ids
            outs.append({"completion_ids": ids, "logp": [0.0] * len(ids), "log_kept": [0.0] * len(ids), "finished": fin,
                         "truncated": not fin})
        return outs

    grads = []
    clip = torch.nn.utils.clip_grad_norm_

    def record_then_clip(params, max_norm, *a, **kw):
        params = list(params)
        for p in params:
            g = p.grad
            grads.append(g.full_tensor() if hasattr(g, "full_tensor") else g.clone())
        return clip(params, max_norm, *a, **kw)

    generate = rl.engine.generate
    rl.engine.generate, torch.nn.utils.clip_grad_norm_ = fixed_rollout, record_then_clip
    try:
        rl.main(args(model, prompts, out) + list(extra))
    finally:
        rl.engine.generate, torch.nn.utils.clip_grad_norm_ = generate, clip
    return grads


if __name__ == "__main__":
    d = common.init_dist()
    out = {}
    for case in CASES:
        full = batch()
        half = [x[d.rank * 4:(d.rank + 1) * 4] for x in full]
        adv, loss = loss_and_adv(*half, *case)
        out[case] = (torch.cat(common.gather_objects([adv])), loss)
    model, prompts, rl_out = sys.argv[2:5]
    grads = [run(model, prompts, f"{rl_out}{k}", *extra) for k, extra in enumerate(RUNS)]
    if d.rank == 0:
        torch.save({"adv": out, "grads": grads}, sys.argv[1])
    cli.finish()
