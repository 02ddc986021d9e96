"""Rollout throughput, in one process on the same weights and prompts: the old eager loop, `generate`
(dynamic cache), `generate` with a static cache + torch.compile, and engine.generate, against the
memory-bandwidth bound.

Two length regimes, both with --new as the limit:
  fixed     every row decodes exactly --new tokens (no stop ids)
  variable  row i stops at a length drawn from a long-tailed law, min(1, 0.25 + Exp(0.4)) x --new
            (mean ~59 % of the limit, ~15 % of the rows at the limit, like long-CoT rollouts).
            engine and the eager loop are told each row's limit (they drop finished rows, or not);
            `generate` cannot stop a row without an EOS, so it decodes every row to the longest.
Useful tokens = Σ_i length_i (what an RL step keeps). One decode step reads every weight once and the
KV cache of every live row, so
    bound = Σ_t (weight_bytes + Σ_{rows live at t} (P + t)·kv_bytes_per_token) / copy_bandwidth
with the copy bandwidth measured here (device-to-device copy: bytes read + written).

  python bench/bench_rollout.py --shape qwen2.5-1.5b --batch 256 --new 1024
  python bench/bench_rollout.py --shape tiny                  # CPU: every path at a tiny shape
  python bench/bench_rollout.py --shape tiny --check          # exactness on this device, no timing
Targets (one H100/H200, 1.5B, batch 256, variable lengths up to 1024): >= 20k useful tok/s
and >= 5x the eager loop; at fixed length >= 60 % of the bandwidth bound.
"""
import time

import torch

import flags
from shapes import random_model

import engine


def copy_bandwidth(device):
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - t0)


def timed(fn, device):
    """Wall seconds of fn(); the process's CPU seconds go to timed.cpu (on a shared CPU the stable number)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    timed.cpu = time.process_time() - c0
    return time.perf_counter() - t0


def lengths_law(batch, limit, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.empty(batch).exponential_(1 / 0.4, generator=g)
    return [max(1, int(limit * min(1.0, 0.25 + float(x)))) for x in e]


def check(model, device, seed=0):
    """Exactness on this device (fp32): engine greedy == generate greedy; CUDA graphs == eager, same seed."""
    g = torch.Generator().manual_seed(seed + 1)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], am[i, L - len(p):] = torch.tensor(p), 1
    ref = model.generate(ids.to(device), attention_mask=am.to(device), max_new_tokens=40, do_sample=False,
                         pad_token_id=0, eos_token_id=None)[:, L:].tolist()
    kw = dict(max_new_tokens=40, stop_ids=[], pad_id=0, len_bucket=16, check_every=8)
    ours = [o["completion_ids"] for o in engine.generate(model, prompts, temperature=0, **kw)]
    agree = sum(a == b for a, b in zip(ours, ref))
    s1 = engine.generate(model, prompts, temperature=1.0, top_p=0.9, seed=3, graphs=device.type == "cuda", **kw)
    s2 = engine.generate(model, prompts, temperature=1.0, top_p=0.9, seed=3, graphs=False, **kw)
    same = sum(a["completion_ids"] == b["completion_ids"] for a, b in zip(s1, s2))
    gap = max(max(abs(x - y) for x, y in zip(a["logp"], b["logp"])) for a, b in zip(s1, s2))
    print(f"check: greedy engine == generate on {agree}/{len(prompts)} rows; graphs vs eager: same tokens on "
          f"{same}/{len(prompts)} rows, max |logp diff| {gap:.2e}", flush=True)


def main():
    p = flags.parser(__doc__, shape="qwen2.5-1.5b", seed=True)
    p.add_argument("--batch", type=int, default=256, help="sequences")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=1024, help="new tokens per sequence (the limit)")
    p.add_argument("--paths", default="eager,generate,static,engine", help="comma list of paths to time")
    p.add_argument("--regimes", default="variable,fixed", help="comma list: variable, fixed")
    p.add_argument("--check", action="store_true", help="only check exactness on this device")
    args = p.parse_args()

    device, dtype = flags.device_dtype()
    if args.shape == "tiny" and device.type == "cpu":
        args.batch, args.prompt, args.new = min(args.batch, 8), min(args.prompt, 8), min(args.new, 24)
    if args.check:  # fp32: random weights give near-tied logits, and bf16 rounding would flip the argmax
        return check(random_model(args.shape, torch.float32, device).eval(), device, args.seed)
    model = random_model(args.shape, dtype, device).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=g).tolist()
    bw = copy_bandwidth(device)
    w_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    Lb = -(-(args.prompt + args.new) // engine.LEN_BUCKET) * engine.LEN_BUCKET  # the last length bucket
    route = engine.attention_route(cfg.num_attention_heads, cfg.num_key_value_heads,
                                   model.model.layers[0].self_attn.head_dim, dtype, device, args.batch, Lb, args.prompt)
    print(f"attention (SDPA backend at batch {args.batch}, {Lb} cached tokens): {route}", flush=True)
    print(f"device {name} | torch {torch.__version__} | shape {args.shape} | batch {args.batch} | prompt {args.prompt} "
          f"| limit {args.new} | copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)

    def hf_generate(static):
        ids = torch.tensor(prompts, device=device)
        kw = dict(cache_implementation="static") if static else {}
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                       do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0, **kw)

    for regime in args.regimes.split(","):
        limits = lengths_law(args.batch, args.new, args.seed) if regime == "variable" else [args.new] * args.batch
        useful = sum(limits)
        bound = sum(w_bytes + sum(args.prompt + t for n in limits if n > t) * kv_tok for t in range(args.new)) / bw
        paths = {
            "eager": lambda: engine.generate(model, prompts, max_new_tokens=limits, stop_ids=[], pad_id=0,
                                             batch_size=args.batch, simple=True, check_every=1),
            "generate": lambda: hf_generate(False),
            "static": lambda: hf_generate(True),
            "engine": lambda: engine.generate(model, prompts, max_new_tokens=limits, stop_ids=[], pad_id=0,
                                              batch_size=args.batch),
        }
        print(f"\n{regime}: {useful:,} useful tokens (mean length {useful / args.batch:.0f})", flush=True)
        rows = {}  # key -> (label, wall s, CPU s, note); printed once every path has run, so x eager is known
        for key in args.paths.split(","):
            label = {"eager": "eager loop (dynamic cache)", "generate": "generate (dynamic cache)",
                     "static": "generate (static cache + compile)", "engine": "engine.generate"}[key]
            note = ""
            try:
                if key in ("static", "engine"):  # compilation is cached across calls; graphs are captured per call
                    note = f"first call {timed(paths[key], device):.2f} s"
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t = timed(paths[key], device)
            except Exception as e:  # noqa: BLE001 -- a path that fails is reported, the others still run
                print(f"{label:<34} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            if key == "engine":
                c = engine.last_call
                note += f"; {c['graphs']} graphs captured in {c['capture_s']:.2f} s, {c['rows']} rows x {c['capacity']}"
            if device.type == "cuda":
                note += f"; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            rows[key] = (label, t, timed.cpu, note)
            print(f"  {label}: {t:.2f} s", flush=True)
        t_eager = rows["eager"][1] if "eager" in rows else float("nan")
        print(f"{'path':<34}{'s':>9}{'useful tok/s':>14}{'x eager':>9}{'% of bound':>12}{'CPU s':>9}", flush=True)
        for label, t, cpu, note in rows.values():
            print(f"{label:<34}{t:>9.2f}{useful / t:>14,.0f}{t_eager / t:>9.2f}{100 * bound / t:>11.1f}%{cpu:>9.2f}"
                  f"  {note.lstrip('; ')}", flush=True)
        print(f"{'bandwidth bound':<34}{bound:>9.2f}{useful / bound:>14,.0f}", flush=True)


if __name__ == "__main__":
    main()
