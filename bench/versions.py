"""What this machine runs: library versions, the device, and the SDPA kernel PyTorch picks for engine.py's
exact attention layouts at each shape of bench/shapes.py (bench/gpu.sh's first stage).

    python bench/versions.py

For each shape, at rollout sizes (64 rows, 4,864 cached tokens, a 256-token prompt) in bf16 on CUDA (fp32 on
the CPU), the backend torch._fused_sdp_choice returns for
    decode   the engine's layout: grouped query heads folded into the query length, a (rows, 1, 1, Lb) mask
    prefill  the engine's layout: is_causal, no mask, enable_gqa
and, for comparison, the layouts the engine does not use: decode with unequal heads (enable_gqa) and the
mask, prefill with a boolean (rows, 1, P, P) mask. MATH on the engine's rows means the fused kernels
refused it: read the warnings SDPA prints with only the math backend disabled (printed below then).
"""
import platform
import warnings

import torch

import flags
import engine
from shapes import SHAPES


def versions():
    import transformers
    import triton
    cuda = torch.cuda.is_available()
    print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | cuDNN "
          f"{torch.backends.cudnn.version() if cuda else None} | transformers {transformers.__version__} | "
          f"triton {triton.__version__}")
    if cuda:
        p = torch.cuda.get_device_properties(0)
        print(f"device {p.name} | sm_{p.major}{p.minor} | {p.total_memory / 2**30:.0f} GiB | "
              f"{p.multi_processor_count} SMs"
              f" | {torch.cuda.device_count()} visible")
    else:
        print("device cpu (no CUDA device visible)")
    print(f"SDPA enabled: flash {torch.backends.cuda.flash_sdp_enabled()}, mem-efficient "
          f"{torch.backends.cuda.mem_efficient_sdp_enabled()}, cudnn {torch.backends.cuda.cudnn_sdp_enabled()}, "
          f"math {torch.backends.cuda.math_sdp_enabled()}")


def choice(q, k, v, mask=None, causal=False, gqa=False):
    names = {int(b.value): n for n, b in torch.nn.attention.SDPBackend.__members__.items()}
    return names[int(torch._fused_sdp_choice(q, k, v, mask, 0.0, causal, scale=None, enable_gqa=gqa))]


def backends(rows=64, Lb=4864, P=256):
    dev, dtype = flags.device_dtype()
    print(f"\nSDPA backend per layout ({rows} rows, {Lb} cached tokens, {P}-token prompts, {dtype}):")
    print(f"{'shape':<14}{'H/KV/hd':>10}  {'decode (engine)':<20}{'prefill (engine)':<20}"
          f"{'decode gqa+mask':<20}{'prefill mask':<20}")
    names = {int(b.value): n for n, b in torch.nn.attention.SDPBackend.__members__.items()}
    refused = []
    for name, s in SHAPES.items():
        H, KV = s["num_attention_heads"], s["num_key_value_heads"]
        hd = s.get("head_dim") or s["hidden_size"] // H
        x = lambda *shape: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        cache = x(rows, KV, Lb + 256, hd)[:, :, :Lb]
        mask = torch.ones(rows, 1, 1, Lb, dtype=torch.bool, device=dev)
        dec, pre = engine.attention_route(H, KV, hd, dtype, dev, rows, Lb, P).replace("decode ", "").split(
            ", prefill ")
        old_dec = choice(x(rows, H, 1, hd), cache, cache, mask, gqa=True)
        old_pre = choice(x(rows, H, P, hd), x(rows, KV, P, hd), x(rows, KV, P, hd),
                         torch.ones(rows, 1, P, P, dtype=torch.bool, device=dev), gqa=True)
        print(f"{name:<14}{f'{H}/{KV}/{hd}':>10}  {dec:<20}{pre:<20}{old_dec:<20}{old_pre:<20}")
        if dev.type == "cuda" and "MATH" in (dec, pre):
            refused.append((name, x(rows, KV, H // KV, hd), cache, mask))
    # the order CUDA settles on at its first choice (cuDNN first on sm_90 / sm_10x with cuDNN > 9.15)
    print(f"SDPA priority order: {[names[int(b)] for b in torch._C._get_sdp_priority_order()]}")
    for name, q, k, mask in refused[:1]:  # why the fused kernels refused the engine's decode layout
        with warnings.catch_warnings(record=True) as w, torch.nn.attention.sdpa_kernel(
                [torch.nn.attention.SDPBackend.FLASH_ATTENTION, torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
                 torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
            warnings.simplefilter("always")
            try:
                torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=mask)
            except RuntimeError as e:
                print(f"{name}: {str(e).splitlines()[0]}")
            for m in w:
                print(f"  {m.message}")


if __name__ == "__main__":
    p = flags.parser(__doc__)
    p.add_argument("--rows", type=int, default=64, help="decode rows (default 64)")
    p.add_argument("--cached", type=int, default=4864, help="cached tokens at decode (default 4864)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens at prefill (default 256)")
    args = p.parse_args()
    versions()
    backends(args.rows, args.cached, args.prompt)
