"""Run by tests/test_families.py as two torchrun "nodes" of 2 processes each (2 x 2 HSDP, chosen
automatically from LOCAL_WORLD_SIZE < WORLD_SIZE): each rank takes its quarter of a fixed SFT batch, the
loss is scaled as sft.py scales it, and rank 0 saves the global loss, the full gradients and their norm.
Then sft.py itself runs on the same mesh (argv[4], a JSON argv, if given). The 1-rank reference is
loss_and_grads(policy, tok, rows, rank=0, world=1).  argv: MODEL ROWS.jsonl OUT.pt [SFT_ARGV_JSON]"""
import json
import sys

import torch

sys.path.insert(0, ".")
import cli  # noqa: E402
import common  # noqa: E402
import sft  # noqa: E402
import tables  # noqa: E402


def loss_and_grads(policy, tok, rows, rank, world):
    """sft.py's step on the rows: rank r's share rows[r::world], loss * world / n_tok (FSDP averages over
    ranks), grads and their clipped-norm total (clip 1.0, after the reduction)."""
    samples = [common.render_sft(tok, r["prompt"], r["response"]) for r in tables.load_pairs(rows)]
    mine = samples[rank::world]
    n_tok = common.all_reduce(torch.tensor(float(sum(sum(m[1:]) for _, m in samples[rank::world]))))
    ids, pos, tgt, lmask = sft.collate(sft.pack(mine, 4096), tok.pad_token_id, "cpu")
    logp, _ = policy(ids, position_ids=pos, targets=tgt)  # (R, L)
    nll = -(logp * lmask).sum()
    (nll * world / n_tok).backward()
    loss = common.all_reduce(nll.detach().clone()) / n_tok
    gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for k, p in policy.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "gnorm": gnorm.item()}


if __name__ == "__main__":
    d = common.init_dist()
    model, rows, out = sys.argv[1:4]
    replicate = common.hsdp_replicas(None, d.world)
    policy, _ = common.build_policy(model, d, torch.float32, replicate=replicate)
    mesh = policy.hf.lm_head.weight.device_mesh if hasattr(policy.hf.lm_head.weight, "device_mesh") else None
    res = loss_and_grads(policy, common.load_tokenizer(model), rows, d.rank, d.world)
    res["mesh"] = list(mesh.shape)
    if d.rank == 0:
        torch.save(res, out)
    if len(sys.argv) > 4:
        sft.main(json.loads(sys.argv[4]))
    cli.finish()
