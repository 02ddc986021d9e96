"""Throughput and memory of kernels/logprobs.py on one GPU (numbers go to docs/perf.md).

    python bench/bench_kernels.py                      # (N, V) = (16384, 151936), (16384, 128256)
    python bench/bench_kernels.py --n 4096 --vocab 151936 --skip-compile

Part 1, bf16 logits -> (token log-prob, entropy), forward and forward+backward (random upstream
gradients into both outputs), for
    triton     kernels.logprobs_and_entropy
    eager      log_softmax(logits.float() / T) and -Σ p log p in PyTorch
    compile    torch.compile of the same eager math
    liger      Liger-Kernel's cross-entropy, if importable (log-prob only, no entropy: a
               bandwidth reference, not a like-for-like op)
Reported: median ms (triton.testing.do_bench), GB/s over the minimum bytes (forward reads the
bf16 logits once: 2NV bytes; forward+backward also reads them again and writes d(logits):
6NV), that as a % of this GPU's measured device-to-device copy bandwidth, and the peak extra
memory (max_memory_allocated above the inputs; for forward+backward it includes d(logits)
itself, 2NV bytes).

Part 2, the lm_head: hidden (N, D) @ weight.T (V, D) -> log-prob and entropy, forward+backward
(d hidden and d weight), for the bare matmul alone (no softmax at all: the floor), matmul then the
Triton kernel on full logits, and kernels.lm_head_logprobs_and_entropy (chunked, recomputing).

Goals: forward >= 80% of copy bandwidth; forward+backward <= 7 ms at 16384 x 151936
on an H100; peak extra memory O(N) in the forward; fused lm_head within 1.2x of the bare matmul
with <= 1/8 of the logits' memory. Note the fused path does 4 matmuls to the bare path's 3 (the
backward recomputes the logits), so 1.33x is its floor where the matmuls dominate.
"""
import datetime
import sys
import time

import torch

import flags
from kernels import lm_head_logprobs_and_entropy, logprobs_and_entropy

DEVICE = flags.device_dtype()[0].type  # cpu: only the --smoke run of bench/gpu.sh


def eager(logits, targets, T):
    """The plain PyTorch math on full float32 (N, V) tensors."""
    logp_all = torch.log_softmax(logits.float() / T, dim=-1)      # (N, V) float32
    p = logp_all.exp()                                            # (N, V) float32
    return logp_all.gather(1, targets[:, None]).squeeze(1), -(p * logp_all).sum(-1)


def liger_fn():
    """Liger-Kernel's cross-entropy as (-summed loss,), or None when missing or incompatible."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        loss = LigerCrossEntropyLoss(reduction="sum")
        def fn(logits, targets, T):
            return (-loss(logits / T if T != 1.0 else logits, targets),)
        fn(torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16),
           torch.zeros(4, dtype=torch.long, device=DEVICE), 1.0)
        return fn
    except Exception as e:  # noqa: BLE001  (an optional baseline never stops the benchmark)
        print(f"liger: skipped ({type(e).__name__}: {e})", flush=True)
        return None


# -----------------------------------------------------------------------------
# measuring

def bench_ms(fn):
    if DEVICE == "cpu":  # smoke run: any number will do
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def peak_extra_bytes(fn):
    """Peak memory allocated while fn() runs, above what was allocated before."""
    if DEVICE == "cpu":
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth_gbs(nbytes=2 << 30):
    """Device-to-device copy: reads and writes nbytes each."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    del a, b
    return 2 * nbytes / ms / 1e6


def measure(name, fn, nbytes, copy_gbs, rows, note=""):
    """One table row: ms, GB/s and % of copy bandwidth (when nbytes is given), peak extra GiB.
    Returns (ms, peak bytes), or None on out-of-memory (reported as a result)."""
    try:
        fn()                                                      # compile / warm up
        ms = bench_ms(fn)
        peak = peak_extra_bytes(fn)
    except torch.cuda.OutOfMemoryError:
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        rows.append((name, "OOM", "", "", "", ""))
        print(f"{name:<44} OOM", flush=True)
        return None
    gbs = nbytes / ms / 1e6 if nbytes else None
    row = (name, f"{ms:.2f}", f"{gbs:.0f}" if gbs else "-",
           f"{100 * gbs / copy_gbs:.0f}%" if gbs else "-", f"{peak / 2**30:.2f}",
           note(ms, peak) if callable(note) else note)
    rows.append(row)
    print(f"{row[0]:<44} {row[1]:>8} ms {row[2]:>6} GB/s {row[3]:>5} of copy  peak +{row[4]} GiB"
          f"  {row[5]}", flush=True)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return ms, peak


# -----------------------------------------------------------------------------

def bench_logprobs(N, V, T, copy_gbs, rows, skip_compile):
    logits = torch.randn(N, V, device=DEVICE, dtype=torch.bfloat16) * 4   # (N, V)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    g, h = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)   # upstream grads
    fns = {"triton": logprobs_and_entropy, "eager": eager}
    if not skip_compile:
        fns["compile"] = torch.compile(eager, dynamic=False)
    liger = liger_fn()
    if liger is not None:
        fns["liger (logp only)"] = liger

    for name, fn in fns.items():
        x = logits.clone() if name.startswith("liger") else logits  # Liger writes d(logits) into x
        def fwd():
            with torch.no_grad():
                fn(x, targets, T)
        measure(f"{name} fwd {N}x{V}", fwd, 2 * N * V, copy_gbs, rows)

        xg = logits.clone().requires_grad_(True)
        def fwd_bwd():
            outs = fn(xg, targets, T)
            if len(outs) == 1:                                    # liger: a summed loss
                torch.autograd.grad(outs[0], xg)
            else:
                torch.autograd.grad(outs, xg, (g, h))
        measure(f"{name} fwd+bwd {N}x{V}", fwd_bwd, 6 * N * V, copy_gbs, rows)
        del x, xg


def bench_lm_head(N, V, D, T, chunks, copy_gbs, rows):
    hidden = torch.randn(N, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, D, device=DEVICE, dtype=torch.bfloat16) / D**0.5).requires_grad_(True)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    g, h = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    dz = torch.randn(N, V, device=DEVICE, dtype=torch.bfloat16)  # stands in for d(logits)
    logits_gib = N * V * 2 / 2**30
    print(f"lm_head {N}x{D} @ {V}x{D}: bf16 logits would be {logits_gib:.2f} GiB", flush=True)

    def bare():
        z = hidden @ weight.T                                     # (N, V)
        torch.autograd.grad(z, (hidden, weight), dz)

    def unfused():
        logp, H = logprobs_and_entropy(hidden @ weight.T, targets, T)
        torch.autograd.grad((logp, H), (hidden, weight), (g, h))

    def fused(C):
        def f():
            logp, H = lm_head_logprobs_and_entropy(hidden, weight, targets, T, chunk_tokens=C)
            torch.autograd.grad((logp, H), (hidden, weight), (g, h))
        return f

    # matmul-bound: no GB/s. The note compares time with the bare matmul, and the peak memory
    # beyond the gradients every method returns (d hidden, d weight) with the bf16 logits.
    grads_gib = (N * D + V * D) * 2 / 2**30

    def vs_logits(ms, peak):
        return f"(peak - grads) = {(peak / 2**30 - grads_gib) / logits_gib:.2f}x logits"
    base = measure(f"bare matmul fwd+bwd {N}x{D}x{V}", bare, None, copy_gbs, rows, vs_logits)
    del dz

    def vs_bare(ms, peak):
        return (f"{ms / base[0]:.2f}x bare time, " if base else "") + vs_logits(ms, peak)
    measure(f"matmul + triton fwd+bwd {N}x{D}x{V}", unfused, None, copy_gbs, rows, vs_bare)
    for C in chunks:
        measure(f"fused lm_head C={C} fwd+bwd {N}x{D}x{V}", fused(C), None, copy_gbs, rows, vs_bare)


def main():
    ap = flags.parser(__doc__)
    ap.add_argument("--n", type=int, default=16384, help="tokens N")
    ap.add_argument("--vocab", type=int, nargs="+", default=[151936, 128256], help="vocab sizes V")
    ap.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    ap.add_argument("--hidden", type=int, default=1536, help="lm_head hidden size D")
    ap.add_argument("--chunk-tokens", type=int, nargs="+", default=[2048, 4096],
                    help="chunk sizes for the fused lm_head path")
    ap.add_argument("--skip-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--skip-lm-head", action="store_true", help="skip part 2")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU (TRITON_INTERPRET=1): a smoke run only")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("bench_kernels.py needs a CUDA GPU (on CPU the kernels run in Triton's "
                 "interpreter, which measures nothing); tests/test_kernels.py checks correctness.")
    import triton

    print(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'} | torch {torch.__version__} | "
          f"triton {triton.__version__}"
          f" | {datetime.date.today()}", flush=True)
    copy_gbs = copy_bandwidth_gbs() if DEVICE == "cuda" else copy_bandwidth_gbs(1 << 20)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for V in args.vocab:
        bench_logprobs(args.n, V, args.temperature, copy_gbs, rows, args.skip_compile)
    if not args.skip_lm_head:
        bench_lm_head(args.n, args.vocab[0], args.hidden, args.temperature, args.chunk_tokens,
                      copy_gbs, rows)

    print(f"\n| {'case':<44} | ms | GB/s | % of copy ({copy_gbs:.0f} GB/s) | peak extra GiB | note |")
    print(f"|{'-' * 46}|---:|---:|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join([f"{r[0]:<44}", *r[1:]]) + " |")


if __name__ == "__main__":
    main()
