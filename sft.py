"""Supervised fine-tuning of a reasoning model on a safety chain-of-thought set (the paper's SFT baseline).

Objective: for each (prompt x, response y) pair, y = "<think> reasoning </think> answer" + end-of-turn,

    L(θ) = - (1 / N_tok) Σ_{examples in the step} Σ_{t ∈ response} log π_θ(y_t | x, y_<t)

ONE token mean over every target token of the optimizer step (N_tok all-reduced across ranks), so the
loss and its gradient do not depend on the micro-batch split or the number of processes.

Recipe (STAR-1's, the defaults here): full fine-tuning, 5 epochs, lr 1e-5, cosine with 5% warmup,
AdamW betas (0.9, 0.95), effective batch 128 sequences, max length 8192, loss on the assistant part only.

Deviations and choices:
  1. The prompt is rendered with the tokenizer's chat template (add_generation_prompt=True) and the
     response text + end-of-turn is appended by hand: R1-Distill templates strip everything up to
     </think> from past assistant turns, which would silently drop the reasoning from the target.
  2. Samples are packed into rows of --max-len tokens; position ids restart per sample and no
     attention mask is passed, which makes transformers build a block-diagonal causal mask (attention
     never crosses samples). Model types not known to keep samples apart (PACKING_EXACT) train unpacked.
  3. The loss never materialises logits: hidden states go through the fused, vocab-chunked lm_head
     kernel (kernels/logprobs.py), which also gives the token entropy for free (logged).
  4. The LR schedule spans --epochs, or --max-steps N when given (it overrides --epochs, as in Hugging
     Face's Trainer: N optimizer steps, the data repeating as needed). --stop-at K pauses the run after
     step K; `--resume` with the same flags trains the rest on the same schedule.
  5. --full-sequence trains on every token (prompt included): used to build the tiny world's base model.
  6. Samples longer than --max-len keep their LAST --max-len tokens (left truncation, as the STAR-1
     recipe): the end of the reasoning, the answer and the end-of-turn stay in the target.
  7. Thinking off (the rendered prompt already closes the think block: Qwen3 with enable_thinking false)
     and a response with reasoning: refused, naming the row, unless --answer-only, which trains on the
     answer alone (common.render_sft).

Commands:
  python sft.py --model Qwen/Qwen2.5-0.5B-Instruct --data rows.jsonl --out out/sft --max-steps 10
  torchrun --nproc_per_node 8 sft.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \\
      --data UCSC-VLAA/STAR-1 --out out/sft-7b --grad-checkpointing \\
      --decontaminate ibm-research/AttaQ
  # two nodes x 8 GPUs, HSDP (shard inside a node, replicate across): run on each node, --node-rank 0 / 1
  torchrun --nnodes 2 --node-rank 0 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
      sft.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --data UCSC-VLAA/STAR-1 --out out/sft-32b \\
      --grad-checkpointing            # --replicate 2 is the default here: one replica per node
"""
import math
import time

import torch

import checkpoint
import cli
import common
import preflight
import resume
import tables
from common import all_reduce
from errors import DataError, UsageError

# Model types whose transformers forward keeps packed samples apart (collate's restarting position ids, no
# attention mask), checked packed == unpacked per family by tests/test_families.py. Not GraniteMoeHybrid: its
# Mamba-2 layers carry their state into the next sample (transformers' seq_idx reaches only the CUDA kernels).
PACKING_EXACT = ("llama", "qwen2", "qwen3")


def packing_exact(config):
    """This model type keeps packed samples apart (PACKING_EXACT)."""
    return getattr(config, "model_type", None) in PACKING_EXACT


# ------------------------------------------------------------------------------------------------
# The model: common.build_policy's, its samples packed into rows when its type keeps them apart

def build_model(args, d, dtype, replicate):
    """The policy (and its export dtype) in train mode, and whether its rows are packed (packing_exact, and
    not --no-pack)."""
    policy, export_dtype = common.build_policy(args.model, d, dtype, args.grad_checkpointing, args.cpu_offload,
                                               args.trust_remote_code, replicate=replicate)
    policy.train()
    packed = not args.no_pack and packing_exact(policy.hf.config)
    if not args.no_pack and not packed:
        common.print0(f"packing off: model type {policy.hf.config.model_type!r} is not known to keep packed samples "
                      "apart (PACKING_EXACT); one sample per row")
    return policy, export_dtype, packed


# ------------------------------------------------------------------------------------------------
# One step: 1. the examples (rendered, decontaminated, packed into rows); 2. the loss and the update

def decontaminate(examples, files):
    """Drop training rows whose prompt shares a 13-gram with any prompt of the eval files."""
    eval_grams = set()
    for f in files.split(","):
        for r in tables.load_pairs(f, need_response=False):
            eval_grams |= common.ngrams(r["prompt"])
    hit = [bool(common.ngrams(e["prompt"]) & eval_grams) for e in examples]
    return [e for e, h in zip(examples, hit) if not h], [e["id"] for e, h in zip(examples, hit) if h]


def load_examples(args, tok):
    """1. data: rows -> decontaminated -> rendered (ids, loss mask) pairs; rows with no target token left
    within --max-len are skipped (counted)."""
    rows = tables.load_pairs(args.data, args.prompt_field, args.response_field)
    if args.decontaminate:
        rows, dropped = decontaminate(rows, args.decontaminate)
        common.print0(f"decontaminate: dropped {len(dropped)} rows sharing a 13-gram with {args.decontaminate}: "
                      f"{dropped}")
    examples, too_long = [], []
    for r in rows:
        try:
            ids, mask = common.render_sft(tok, r["prompt"], r["response"], args.max_len, args.chat_template_kwargs,
                                          "drop" if args.answer_only else "refuse")
        except UsageError as e:
            hint = "" if args.answer_only else "; pass --answer-only to train on the answer alone"
            raise DataError(f"{args.data}: row {r['row']}: {e}{hint}") from None
        if args.full_sequence:
            mask = [True] * len(ids)
        (examples if any(mask[1:]) else too_long).append((ids, mask))
    if too_long:
        common.print0(f"warning: {len(too_long)} rows have no response token within --max-len {args.max_len}; skipped")
    if not examples:
        raise DataError(f"{args.data}: no usable rows")
    return examples


def pack(samples, max_len, packed=True):
    """Group samples (ids, mask) into rows of at most max_len tokens (first-fit) -> list of rows,
    each a list of samples. Without packing, one sample per row."""
    if not packed:
        return [[s] for s in samples]
    rows, room = [], []
    for s in sorted(samples, key=lambda s: -len(s[0])):
        i = next((i for i, r in enumerate(room) if r >= len(s[0])), None)
        if i is None:
            rows.append([]), room.append(max_len)
            i = len(rows) - 1
        rows[i].append(s)
        room[i] -= len(s[0])
    return rows


def collate(rows, pad_id, device):
    """Rows of samples -> input_ids, position_ids, targets, loss_mask, each (R, L).
    Position ids restart at 0 for every sample (and for the pad tail), so with no attention mask
    transformers builds a block-diagonal causal mask. targets[t] = ids[t+1] inside a sample; the
    loss mask is True where targets[t] is a response token."""
    L = max(sum(len(ids) for ids, _ in r) for r in rows)
    R = len(rows)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    tgt = torch.zeros((R, L), dtype=torch.long)
    lmask = torch.zeros((R, L), dtype=torch.bool)
    for i, r in enumerate(rows):
        o = 0
        for s_ids, s_mask in r:
            n = len(s_ids)
            ids[i, o:o + n] = torch.tensor(s_ids)
            pos[i, o:o + n] = torch.arange(n)
            tgt[i, o:o + n - 1] = torch.tensor(s_ids[1:])
            lmask[i, o:o + n - 1] = torch.tensor(s_mask[1:])
            o += n
        pos[i, o:] = torch.arange(L - o)
    return ids.to(device), pos.to(device), tgt.to(device), lmask.to(device)


def update(policy, opt, batch, args, d, autocast, step, pad_id, packed):
    """2. One optimizer step on the global batch: this rank's share, packed into rows, forward and backward
    of the ONE token mean over every target token of the step (N_tok all-reduced; FSDP averages gradients
    over ranks, so each loss is scaled by world / N_tok), the gradient clipped after the reduction, checked
    finite on every rank, then stepped. Every rank runs the same number of forwards (FSDP collectives): a
    rank out of samples runs the batch's first sample with weight 0. Returns the sums the log needs."""
    mine = batch[d.rank::d.world]  # this rank's share of the global batch
    n_micro = math.ceil(math.ceil(len(batch) / d.world) / args.micro_batch_size)
    n_tok = all_reduce(torch.tensor(float(sum(sum(m[1:]) for _, m in mine)), device=d.device))
    loss_sum, ent_sum, tokens = 0.0, 0.0, 0
    for j in range(n_micro):
        micro = mine[j * args.micro_batch_size:(j + 1) * args.micro_batch_size]
        weight = 1.0 if micro else 0.0
        ids, pos, tgt, lmask = collate(pack(micro or batch[:1], args.max_len, packed), pad_id, d.device)
        with autocast:
            logp, ent = policy(ids, position_ids=pos, targets=tgt)  # (R, L) each
        nll = -(logp * lmask).sum()
        (nll * weight * d.world / n_tok).backward()
        loss_sum += nll.item() * weight
        ent_sum += (ent.detach() * lmask).sum().item() * weight
        tokens += int(ids.numel() * weight)
    gnorm = common.clip_grad_norm(policy, args.clip)
    checkpoint.check_finite(step + 1, d.device, loss=loss_sum, grad_norm=gnorm)  # before the update, every rank
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (loss_sum, ent_sum, tokens, n_tok), gnorm


# ------------------------------------------------------------------------------------------------
# 3. The step's log

def step_metrics(sums, gnorm, lr, dt, device):
    """3. The step's log: the token means of the loss and the entropy over every rank's target tokens (one
    all-reduce), the tokens the step's rows held (pads included) and their rate."""
    loss_sum, ent_sum, tokens, n_tok = sums
    stats = all_reduce(torch.tensor([loss_sum, ent_sum, float(tokens)], device=device))
    return {"loss": stats[0].item() / n_tok.item(), "entropy": stats[1].item() / n_tok.item(),
            "grad_norm": gnorm.item(), "lr": lr, "tokens": int(stats[2].item()), "tok/s": stats[2].item() / dt,
            "dt": dt}


# ------------------------------------------------------------------------------------------------
# The command line

def step_flags(p):
    """The flags of the step's phases, one group per step of the module docstring."""
    a = p.add_argument_group("1. data").add_argument
    a("--prompt-field", default=None, help="column holding the prompt (default: detected)")
    a("--response-field", default=None, help="column holding the response (default: detected)")
    a("--chat-template-kwargs", type=cli.chat_template_kwargs, default=None, metavar="JSON",
      help='template variables for apply_chat_template, e.g. \'{"enable_thinking": false}\'')
    a("--decontaminate", default=None, help="FILE[,FILE]: drop rows sharing a 13-gram with their prompts")
    a("--max-len", type=int, default=8192, help="max tokens per sample, its last ones kept (and per packed row)")
    a("--no-pack", action="store_true", help="one sample per row instead of packing (automatic for "
      "model types that cannot keep packed samples apart: PACKING_EXACT)")
    a("--full-sequence", action="store_true", help="loss on every token, prompt included")
    a("--answer-only", action="store_true", help="with thinking off (the prompt already closes the think "
      "block, e.g. Qwen3's enable_thinking false), train on each response's answer alone, its reasoning "
      "dropped (without this flag such rows are refused: the target would hold two think blocks)")
    a = p.add_argument_group("2. loss and update").add_argument
    a("--batch-size", type=int, default=128, help="global sequences per optimizer step")
    a("--micro-batch-size", type=int, default=4, help="sequences per forward on each rank")


def training_flags(p):
    """The optimizer, memory, checkpoint and logging flags: cli.py's shared ones with sft's defaults."""
    cli.add_optimizer_flags(p, lr=1e-5, warmup_ratio=0.05, warmup_of="all steps")
    cli.add_memory_flags(p.add_argument_group("memory").add_argument, offload_of="params/grads/optimizer")
    a = p.add_argument_group("checkpoints and logging").add_argument
    cli.add_checkpoint_flags(a, (), "state and metrics", 0, "every N steps save the state and the export, and keep "
                             "OUT/checkpoints/step-N (0: only at the end)")
    a("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    a("--wandb", default=None, metavar="PROJECT", help="also log to this wandb project")


def get_args(argv=None):
    p = cli.ArgumentParser(description="Supervised fine-tuning (response-only loss) on FSDP2.")
    a = p.add_argument_group("run").add_argument
    a("--model", required=True, help="hub id or local Hugging Face dir of the model to fine-tune")
    a("--data", required=True, help="hub id (id[:config]:split) or local .jsonl/.json/.csv/.parquet")
    a("--out", required=True, help="output dir: HF checkpoint, args.json, metrics.jsonl, state/")
    a("--epochs", type=int, default=5, help="passes over the data (the LR schedule spans them)")
    a("--max-steps", type=int, default=None,
      help="total optimizer steps; overrides --epochs and sets the LR schedule's length (as HF Trainer)")
    a("--stop-at", type=int, default=None, help="stop after this step (resume later with --resume)")
    a("--seed", type=int, default=0, help="seed for data order and init")
    step_flags(p)
    training_flags(p)
    return p.parse_args(argv)


def check_args(args, d):
    """Every flag value, then --model (preflight.check_model), before any weight or data is read (the flag is
    named in the message)."""
    cli.check_min(args, "--epochs", "--max-steps", "--stop-at", "--batch-size", "--micro-batch-size", "--max-len")
    cli.check_min(args, "--save-every", "--keep-checkpoints", lo=0)
    if args.batch_size % d.world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the world size {d.world}")
    cli.check_training(args, d.device)  # --lr, --betas, ..., --optim, --resume, --wandb, --out
    preflight.check_model(args.model, "--model", trust_remote_code=args.trust_remote_code)


def main(argv=None):
    args = get_args(argv)

    # --------------------------------------------------------------------------- compute init
    d = common.init_dist(args.device, args.dist_timeout)
    check_args(args, d)  # the flags, then the model dir: before any weight is read
    common.seed_everything(args.seed)
    dtype = common.pick_dtype(args.dtype, d.device)
    replicate = common.hsdp_replicas(args.replicate, d.world)

    # --------------------------------------------------------------------------- data (validated first)
    tok = common.load_tokenizer(args.model, args.trust_remote_code, what="--model")
    examples = load_examples(args, tok)  # [(ids, loss mask)], validated before any model loads
    spe = math.ceil(len(examples) / args.batch_size)  # optimizer steps per epoch (the last batch may be short)
    total = args.max_steps or spe * args.epochs  # the schedule's length: --max-steps overrides --epochs
    stop = min(total, args.stop_at or total)

    checkpoint.claim_out_dir(args.out, args.resume, args.overwrite)  # the run's lock; refuses another run's dir
    changes = resume.resume_changes(args) if args.resume else {}  # a changed flag: refused unless --allow-changes

    # --------------------------------------------------------------------------- models
    policy, export_dtype, packed = build_model(args, d, dtype, replicate)
    opt, sched = common.build_optimizer(policy.parameters(), args, total)  # AdamW, warmup + cosine
    # One process keeps fp32 weights and autocasts; under FSDP2 the mixed-precision policy does it.
    autocast = torch.autocast(d.device.type, dtype=dtype, enabled=(d.world == 1 and dtype != torch.float32))

    step = checkpoint.restore(args, policy, opt, sched, changes)  # 0, or --resume's step; args.json written
    log = cli.Logger(args.out, total, args.wandb, vars(args))
    common.print0(f"sft: {len(examples)} examples, {spe} steps/epoch, {total} steps (stop at {stop}), world {d.world}"
                  f"{f' (HSDP {replicate} x {d.world // replicate})' if replicate > 1 else ''}, dtype {dtype}")

    # --------------------------------------------------------------------------- loop
    while step < stop:
        t0 = time.time()
        epoch, k = divmod(step, spe)  # 1. this step's examples: a seeded permutation per epoch
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        batch = [examples[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size]]
        sums, gnorm = update(policy, opt, batch, args, d, autocast, step, tok.pad_token_id, packed)  # 2.
        lr = sched.get_last_lr()[0]
        sched.step()
        step += 1
        log.log(step, step_metrics(sums, gnorm, lr, time.time() - t0, d.device))  # 3.
        checkpoint.save_step(args, policy, tok, opt, sched, export_dtype, step, stop)  # the export, then the state
    common.print0(f"done: {args.out}")
    checkpoint.release_out_dirs(args.out)
    return policy


if __name__ == "__main__":
    cli.cli_main(main)
