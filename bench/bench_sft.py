"""SFT training throughput: tokens/s and MFU of sft.py's step (packed rows, fused lm_head loss, AdamW).

A random-weight model of a real shape (bench/shapes.py), rows of --seq tokens packed from samples of
random lengths (position ids restart per sample, as sft.py packs), bf16 compute with fp32 master
weights, optional activation checkpointing. MFU counts the model FLOPs of a step,
6·N·tokens + 6·L·d·Σ s_i² (N = parameters without the input embedding; the attention term is
causal, summed over the packed samples of lengths s_i), over the GPU's dense bf16 peak; the
recomputation of activation checkpointing is not counted (the usual convention).

  python bench/bench_sft.py --shape qwen2.5-1.5b --seq 4096 --grad-checkpointing     # one GPU
  python bench/bench_sft.py --shape tiny --seq 256 --steps 2                          # CPU smoke run
Goal: >= 40% MFU on one H100 for the 1.5B shape at 4096 tokens per row.
"""
import time

import torch

import flags
from shapes import n_params, peak_flops, random_model

import common
import sft


def main():
    p = flags.parser(__doc__, shape="qwen2.5-1.5b", seed=True)
    p.add_argument("--seq", type=int, default=4096, help="tokens per packed row")
    p.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after 2 warm-up steps)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per layer")
    p.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa | flex_attention | flash_attention_2")
    args = p.parse_args()

    device, dtype = flags.device_dtype()
    hf = random_model(args.shape, torch.float32, device)
    hf.config._attn_implementation = args.attn
    if args.grad_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = common.Policy(hf).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")
    V, L, d = hf.config.vocab_size, hf.config.num_hidden_layers, hf.config.hidden_size
    N = n_params(hf)

    g = torch.Generator().manual_seed(args.seed)
    rows, attn_flops = [], 0
    for _ in range(args.rows):  # samples of 256..seq/2 tokens packed into one row
        row, room = [], args.seq
        while room > 0:
            n = min(room, int(torch.randint(256, max(257, args.seq // 2), (1,), generator=g)))
            ids = torch.randint(0, V, (n,), generator=g).tolist()
            row.append((ids, [False] * (n // 4) + [True] * (n - n // 4)))
            attn_flops += 6 * L * d * n * n
            room -= n
        rows.append(row)
    ids, pos, tgt, lmask = sft.collate(rows, 0, device)
    tokens = ids.numel()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logp, _ = policy(ids, position_ids=pos, targets=tgt)
        (-(logp * lmask).sum() / lmask.sum()).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    name, peak = peak_flops(device)
    flops = 6 * N * tokens + attn_flops
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"device {name} | torch {torch.__version__} | shape {args.shape} ({N / 1e9:.2f}B non-embedding params) "
          f"| attn {args.attn} | grad ckpt {args.grad_checkpointing}")
    print(f"tokens/step {tokens} | step {dt * 1e3:.1f} ms | {tokens / dt:,.0f} tok/s | "
          f"{flops / dt / 1e12:.1f} TFLOP/s | MFU {100 * flops / dt / peak:.1f}% | peak mem {mem:.1f} GiB")


if __name__ == "__main__":
    main()
