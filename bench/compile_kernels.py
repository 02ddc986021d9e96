"""Compile every Triton kernel of kernels/ for NVIDIA GPUs ahead of time, on any machine (no GPU needed),
and print registers, shared memory, spills and occupancy per (kernel, arch, dtype, launch config).

    python bench/compile_kernels.py                          # sm_80 and sm_90, bf16 / fp16 / fp32
    python bench/compile_kernels.py --arch 90 --dtypes bf16  # one arch, one dtype

How. The launch sites themselves say what to compile: the kernels are swapped for recorders, the
public functions (logprobs_and_entropy forward + backward, lm_head_logprobs_and_entropy) run on
CPU tensors of each dtype and vocabulary size, and every launch is recorded with its arguments,
grid and options (BLOCK_V, num_warps). Triton's own argument binder then turns each recorded
launch into the signature, constants and specialization (16-byte alignment, ints divisible by
16) a real launch would compile, and `triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))` runs the whole pipeline down to a cubin with the ptxas the triton wheel ships.
Registers, spill bytes and shared memory are read from `ptxas -v` on the same PTX; occupancy is
resident warps per SM / 64 from the register file (64K 32-bit registers, allocated per warp in
units of 256), shared memory (164 KB per SM on sm_80, 228 KB on sm_90, 1 KB reserved per block)
and the 64-warp / 32-block limits.

Exit status 1 on a compile error or any spill; every kernel function of kernels/ must be
launched by some recorded call (a new kernel without a launch here fails too). Prints
`SKIP: reason` and exits 0 when this triton cannot compile for CUDA offline (no NVIDIA backend,
no ptxas). Nothing is cached across runs: TRITON_CACHE_DIR is a fresh temporary directory.
"""
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, not interpreted ones
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-aot-")

import torch  # noqa: E402

import flags  # noqa: E402

SMEM_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# vocabularies of the paper's families (Qwen2.5 / R1-Distill-Qwen, Llama 3.1) and one not divisible
# by 16 (no alignment specialization) and one small (the tiny models' launch config)
VOCABS = (151936, 128256, 49155, 1000)


def occupancy(regs, smem, warps, arch):
    """Fraction of the SM's 64 warp slots that blocks of this kernel can fill."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (65536 // regs_per_warp) // warps
    by_threads = 64 // warps
    by_smem = SMEM_PER_SM.get(arch, 100 * 1024) // (smem + 1024)
    blocks = min(by_regs, by_threads, by_smem, 32)
    return blocks * warps / 64


class Recorder:
    """Stands in for a @triton.jit function: `kernel[grid](*args, **kw)` records the launch."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.launches.append((self.fn, args, kw))
        return launch


def record_launches(dtypes, vocabs):
    """Run the public functions of kernels/ on CPU tensors with the kernels replaced by recorders."""
    import kernels.logprobs as K
    jitted = {n: f for n, f in vars(K).items() if type(f).__name__ == "JITFunction"}
    launches = []
    saved = {n: getattr(K, n) for n in jitted}
    for n, f in jitted.items():
        setattr(K, n, Recorder(f, launches))
    use_triton = K._use_triton
    K._use_triton = lambda x: True
    try:
        for dt in dtypes:
            for V in vocabs:
                x = torch.zeros(2, V, dtype=dt, requires_grad=True)  # (N, V)
                y = torch.zeros(2, dtype=torch.long)
                logp, H = K.logprobs_and_entropy(x, y)
                (logp.sum() + H.sum()).backward()
                h = torch.zeros(2, 8, dtype=dt, requires_grad=True)  # (N, D)
                w = torch.zeros(V, 8, dtype=dt, requires_grad=True)  # (V, D)
                logp, H = K.lm_head_logprobs_and_entropy(h, w, y, chunk_tokens=2)
                (logp.sum() + H.sum()).backward()
    finally:
        for n, f in saved.items():
            setattr(K, n, f)
        K._use_triton = use_triton
    return jitted, launches


def ptxas_stats(ptx, arch):
    """(registers, spill store bytes, spill load bytes, shared bytes) from `ptxas -v` on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        open(src, "w").write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", src,
               "-o", os.path.join(d, "k.o")]  # the flags triton's own make_cubin passes
        p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = p.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    st = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    ld = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    smem = re.search(r"(\d+) bytes smem", log)
    return regs, st, ld, int(smem.group(1)) if smem else 0


def main():
    p = flags.parser(__doc__)
    p.add_argument("--arch", default="80,90",
                   help="compute capabilities to compile for, comma-separated (default 80,90)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="logits dtypes, comma-separated (default bf16,fp16,fp32)")
    p.add_argument("--vocab", default=",".join(map(str, VOCABS)),
                   help=f"vocabulary sizes whose launch configs are compiled (default {','.join(map(str, VOCABS))})")
    p.add_argument("--maxnreg", type=int, default=None,
                   help="cap registers per thread (ptxas then spills: checks that spills are caught)")
    args = p.parse_args()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90).path  # noqa: B018  (raises when the wheel ships no ptxas)
    except Exception as e:  # noqa: BLE001
        print(f"SKIP: this triton cannot compile for CUDA offline ({type(e).__name__}: {e})")
        return 0
    archs = [int(a) for a in args.arch.split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    jitted, launches = record_launches(dtypes, [int(v) for v in args.vocab.split(",")])
    print(f"triton {triton.__version__}, torch {torch.__version__}; {len(launches)} launches recorded")
    print(f"{'kernel':<12} {'arch':>5} {'dtype':>6} {'BLOCK_V':>7} {'warps':>5} {'stages':>6} {'V%16':>5} "
          f"{'regs':>4} {'smem B':>6} {'occup.':>6} {'spills':>6} {'s':>5}")
    seen, failures = set(), 0
    t_all = time.time()
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        for fn, a, kw in launches:
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, opts = binder(*a, **kw)
            options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
            options = {**options.__dict__, **({"maxnreg": args.maxnreg} if args.maxnreg else {})}
            key = (fn.__name__, arch, str(signature), str(constexprs), str(attrs), str(options))
            if key in seen:
                continue
            seen.add(key)
            dt = next(v for k, v in signature.items() if v.startswith("*"))[1:]
            # "yes": V and the row stride are multiples of 16 (Triton specializes them as 16-aligned)
            aligned = "yes" if any(len(v) for k, v in attrs.items() if signature[fn.arg_names[k[0]]] == "i32") else "no"
            t0 = time.time()
            try:
                k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
                regs, st, ld, smem_ptx = ptxas_stats(k.asm["ptx"], arch)
            except Exception as e:  # noqa: BLE001
                failures += 1
                print(f"{fn.__name__:<12} sm_{arch:<2} {dt:>6}  COMPILE ERROR: {type(e).__name__}: {str(e)[:500]}")
                continue
            smem = max(k.metadata.shared, smem_ptx)
            occ = occupancy(regs, smem, k.metadata.num_warps, arch)
            spills = st + ld
            failures += spills > 0
            print(f"{fn.__name__:<12} sm_{arch:<3}{dt:>6} {kw['BLOCK_V']:>7} {k.metadata.num_warps:>5} "
                  f"{k.metadata.num_stages:>6} {aligned:>5} {regs:>4} {smem:>6} {occ:>6.0%} {spills:>6} "
                  f"{time.time() - t0:>5.1f}" + ("  SPILLS" if spills else ""))
    missing = sorted(set(jitted) - {fn.__name__ for fn, _, _ in launches})
    if missing:
        failures += 1
        print(f"kernels never launched by the recorded calls (add their launch here): {', '.join(missing)}")
    print(f"{len(seen)} compiles in {time.time() - t_all:.1f}s; {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
