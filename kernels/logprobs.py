"""Token log-probs and entropies over a large vocabulary, without a float32 [tokens, vocab] tensor.

Every stage needs, for each token t with logits x_t (V = 128k-256k entries), sampling
temperature τ and target token y_t:

    z      = x / τ                                   (float32, in registers only)
    lse    = log Σ_v e^(z_v)
    logp_y = z_y - lse                               token log-prob
    H      = -Σ_v p_v log p_v = lse - Σ_v p_v z_v    entropy, p = e^(z - lse)

One pass over the vocabulary in chunks, carrying the running max m and two SHIFTED sums

    d = Σ e^(z-m)        a = Σ e^(z-m) (z-m)

gives lse = m + log d and H = log d - a/d (since log p = (z-m) - log d). Unshifted sums
(Σ e^z z) overflow, and lose every digit on peaked rows, one logit 30 above the rest. When a
new chunk raises the max from m to m', the old sums move to the new shift with α = e^(m-m'):

    d' = α d                  a' = Σ e^(z-m') (z-m') = α (a + (m - m') d)

and the chunk's own terms are added. -inf logits (masked vocab) give e^(-inf) = 0, and their
e^(z-m)(z-m) = 0·(-inf) is replaced by 0 with a `where`, i.e. 0·log 0 = 0.

Backward, for upstream gradients g (of logp_y) and h (of H), with respect to the raw logits x:

    ∂logp_y/∂z = onehot(y) - p          ∂H/∂z_v = -p_v (log p_v + H)
    ∂L/∂x      = (g (onehot(y) - p) - h p (log p + H)) / τ

Memory traffic. The logits are the only large tensor: N·V·b bytes (b = 2 for bf16; 5 GB at
N=16384, V=151936). `log_softmax(logits.float())` reads them, writes a float32 copy (2x), then
more float32 [N, V] passes for p, p·log p and the gather: ~10x the logits' bytes and 2x their
memory. Here the forward reads the logits once (N·V·b bytes) and writes 4 floats per row; the
backward reads them once more and writes d(logits) once: 3·N·V·b bytes in total, the minimum for
a fused op whose gradient is a full [N, V] tensor. Extra memory is O(N) in the forward, plus the
gradient itself in the backward.

`lm_head_logprobs_and_entropy` goes one step further: it takes the hidden states and the lm_head
weight and computes logits one chunk of tokens at a time (recomputed in the backward), so not even
the bf16 [N, V] logits exist.

Dispatch: Triton on CUDA tensors. On CPU, the Triton interpreter when TRITON_INTERPRET=1 was set
BEFORE this module was imported (Triton reads it when `@triton.jit` runs, at import), otherwise
the chunked PyTorch reference below.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once, at import (see above)


# -----------------------------------------------------------------------------
# PyTorch reference (also the CPU fallback): the same math, a chunk of rows at a time

def _rows_budget(V, elems=1 << 20):
    """Rows per chunk so that one float32 (rows, V) temporary is ~4 MB."""
    return max(1, elems // V)


def _reference_rows(x, y, temperature):
    """logp_y, H, m, log d (float32, (n,)) for a few rows x (n, V) of any float dtype."""
    z = x.float() / temperature                                   # (n, V) the only float32 copy
    m = z.detach().amax(dim=-1, keepdim=True)                     # (n, 1) a constant shift
    s = z - m                                                     # (n, V) z - m, as in the kernel
    log_d = s.exp().sum(-1, keepdim=True).log()                   # (n, 1)
    logp_all = s - log_d                                          # (n, V) log p
    p = logp_all.exp()                                            # (n, V)
    H = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)          # (n,) 0·log 0 = 0
    logp = logp_all.gather(1, y[:, None]).squeeze(1)              # (n,)
    return logp, H, m.squeeze(1), log_d.squeeze(1)


def _reference_backward_rows(x, y, g, h, temperature):
    """d(logits) for a few rows, by autograd through _reference_rows (recomputed here)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logp, H, _, _ = _reference_rows(x, y, temperature)
        (dx,) = torch.autograd.grad((logp, H), x, (g, h))
    return dx                                                     # (n, V) x's dtype


class _Reference(torch.autograd.Function):
    """Chunked over rows in BOTH directions: the backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, x, y, temperature, chunk_rows):
        N, V = x.shape
        logp = torch.empty(N, dtype=torch.float32, device=x.device)
        H = torch.empty_like(logp)
        for i in range(0, N, chunk_rows):
            logp[i:i + chunk_rows], H[i:i + chunk_rows], _, _ = _reference_rows(
                x[i:i + chunk_rows], y[i:i + chunk_rows], temperature)
        ctx.save_for_backward(x, y)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return logp, H

    @staticmethod
    def backward(ctx, g, h):
        x, y = ctx.saved_tensors
        g = torch.zeros_like(x[:, 0], dtype=torch.float32) if g is None else g
        h = torch.zeros_like(x[:, 0], dtype=torch.float32) if h is None else h
        dx = torch.empty_like(x)                                  # (N, V)
        c = ctx.chunk_rows
        for i in range(0, x.shape[0], c):
            dx[i:i + c] = _reference_backward_rows(x[i:i + c], y[i:i + c], g[i:i + c], h[i:i + c],
                                                   ctx.temperature)
        return dx, None, None, None


def logprobs_and_entropy_reference(logits, targets, temperature=1.0, chunk_rows=None):
    """PyTorch version of `logprobs_and_entropy`: float32 temporaries for `chunk_rows` rows at a
    time (default: ~4 MB each), never for all N. Differentiable (the backward recomputes)."""
    x, y, shape = _flatten(logits, targets)
    logp, H = _Reference.apply(x, y, float(temperature), chunk_rows or _rows_budget(x.shape[1]))
    return logp.view(shape), H.view(shape)


# -----------------------------------------------------------------------------
# Triton kernels: one program per row, streaming over the vocabulary in BLOCK_V chunks

@triton.jit
def _fwd_kernel(x_ptr, stride_x, y_ptr, logp_ptr, ent_ptr, m_ptr, log_d_ptr, V, inv_tau,
                BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)            # int64: row * stride_x exceeds 2^31
    x_row = x_ptr + row * stride_x
    # 1. one pass over the vocabulary: the running max m (a scalar) and the shifted sums
    #    d = Σ e^(z-m), a = Σ e^(z-m)(z-m), kept per lane (BLOCK_V partial sums, one reduction at
    #    the end instead of two per chunk)
    m = float("-inf")
    d = tl.zeros([BLOCK_V], dtype=tl.float32)
    a = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_tau
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # 2. move the old sums to the new shift: d' = α d, a' = α (a + (m - m') d), α = e^(m-m').
        #    While every logit so far is -inf, m = m' = -inf: shift by 0 instead (d = a = 0 then).
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        delta = tl.where(m > float("-inf"), m - shift, 0.0)
        alpha = tl.exp(delta)
        s = z - shift                                # (BLOCK_V,) z - m', -inf for masked logits
        e = tl.exp(s)                                # (BLOCK_V,) 0 for -inf logits
        a = alpha * (a + delta * d) + e * tl.where(e > 0, s, 0.0)   # 0·(-inf) := 0
        d = alpha * d + e
        m = m_new
    # 3. sum the lanes; logp_y = z_y - lse = (z_y - m) - log d, H = log d - a/d. lse = m + log d
    #    is kept as its two terms: z - m rounds relative to |z - m|, small wherever p is not, so
    #    log p loses no digits to a large |lse|.
    d = tl.sum(d, axis=0)
    a = tl.sum(a, axis=0)
    log_d = tl.log(d)
    y = tl.load(y_ptr + row)
    z_y = tl.load(x_row + y).to(tl.float32) * inv_tau
    tl.store(logp_ptr + row, (z_y - m) - log_d)
    tl.store(ent_ptr + row, log_d - a / d)
    tl.store(m_ptr + row, m)
    tl.store(log_d_ptr + row, log_d)


@triton.jit
def _bwd_kernel(x_ptr, stride_x, dx_ptr, stride_dx, y_ptr, m_ptr, log_d_ptr, ent_ptr, g_ptr, h_ptr,
                V, inv_tau, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    dx_row = dx_ptr + row * stride_dx
    # 1. per-row scalars from the forward (m, log d, H) and the upstream gradients (g, h)
    y = tl.load(y_ptr + row)
    m = tl.load(m_ptr + row)
    log_d = tl.load(log_d_ptr + row)
    H = tl.load(ent_ptr + row)
    g = tl.load(g_ptr + row)
    h = tl.load(h_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        # 2. recompute log p and p for this chunk
        z = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
        logp = (z - m) - log_d
        p = tl.exp(logp)
        # 3. dz = g (onehot - p) - h p (log p + H), with 0·log 0 = 0; then d/dx = dz / τ
        dz = tl.where(cols == y, g, 0.0) - g * p - h * p * tl.where(p > 0, logp + H, 0.0)
        # 4. written in the logits' dtype (may overwrite x itself: each element is read first)
        tl.store(dx_row + cols, (dz * inv_tau).to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_config(V):
    """Block size and warps by a fixed heuristic (no autotune: the interpreter rejects config
    lists). 4096-wide chunks, 8 warps: 16 values per thread, several programs per SM in flight."""
    BLOCK_V = min(4096, triton.next_power_of_2(V))
    return BLOCK_V, (8 if BLOCK_V >= 4096 else 4 if BLOCK_V >= 1024 else 1)


def _use_triton(x):
    return x.is_cuda or INTERPRET


def _forward_rows(x, y, temperature):
    """(logp, H, m, log d), float32 (N,), for logits x (N, V) with x.stride(1) == 1."""
    if not _use_triton(x):
        with torch.no_grad():
            return _reference_rows(x, y, temperature)
    N, V = x.shape
    logp, H, m, log_d = (torch.empty(N, dtype=torch.float32, device=x.device) for _ in range(4))
    BLOCK_V, num_warps = _launch_config(V)
    _fwd_kernel[(N,)](x, x.stride(0), y, logp, H, m, log_d, V, 1.0 / temperature,
                      BLOCK_V=BLOCK_V, num_warps=num_warps)
    return logp, H, m, log_d


def _backward_rows(x, y, m, log_d, H, g, h, temperature, out=None):
    """d(logits), x's dtype, into `out` (a fresh tensor unless given; may be x itself)."""
    g = torch.zeros_like(H) if g is None else g.float().contiguous()  # never written to
    h = torch.zeros_like(H) if h is None else h.float().contiguous()
    if not _use_triton(x):
        dx = _reference_backward_rows(x, y, g, h, temperature)
        return dx if out is None else out.copy_(dx)
    out = torch.empty_like(x) if out is None else out
    N, V = x.shape
    BLOCK_V, num_warps = _launch_config(V)
    _bwd_kernel[(N,)](x, x.stride(0), out, out.stride(0), y, m, log_d, H, g, h, V,
                      1.0 / temperature, BLOCK_V=BLOCK_V, num_warps=num_warps)
    return out


# -----------------------------------------------------------------------------
# autograd wrappers and the public API

def _flatten(logits, targets):
    """(..., V) logits -> (N, V) with unit stride along V (copies only if needed)."""
    x = logits.reshape(-1, logits.shape[-1])                       # (N, V)
    if x.stride(1) != 1:
        x = x.contiguous()
    y = targets.reshape(-1).clamp_min(0)                          # (N,) ignore-index -> 0
    return x, y, logits.shape[:-1]


class _LogprobsEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, y, temperature):
        logp, H, m, log_d = _forward_rows(x, y, temperature)
        ctx.save_for_backward(x, y, m, log_d, H)                  # lse = m + log d
        ctx.temperature = temperature
        return logp, H

    @staticmethod
    def backward(ctx, g, h):
        x, y, m, log_d, H = ctx.saved_tensors
        return _backward_rows(x, y, m, log_d, H, g, h, ctx.temperature), None, None


def logprobs_and_entropy(logits, targets, temperature=1.0):
    """Token log-probs and entropies of softmax(logits / temperature).

    logits: (N, V) float32 / bfloat16 / float16, any V, any row stride (leading dims (..., V) are
    flattened); targets: (N,) int64 in [0, V), negative ones (e.g. -100) are read as 0: mask the
    result yourself. Returns logp (N,) and entropy (N,), float32, both differentiable w.r.t.
    logits; the gradient has the logits' dtype. No float32 (N, V) tensor is ever created.
    """
    x, y, shape = _flatten(logits, targets)
    if _use_triton(x):
        logp, H = _LogprobsEntropy.apply(x, y, float(temperature))
    else:
        logp, H = logprobs_and_entropy_reference(x, y, temperature)
    return logp.view(shape), H.view(shape)


class _LMHeadLogprobsEntropy(torch.autograd.Function):
    """logits = hidden @ weight.T one chunk of tokens at a time, in both directions, in ONE dtype: the
    autocast dtype when autocast is on (as autocast would run the matmul), else the hidden's. Autocast is
    off in the backward, so the forward's dtype is saved and both directions cast explicitly: the
    recomputed logits are exactly the forward's, consistent with the saved max and log-sum."""

    @staticmethod
    def forward(ctx, hidden, weight, y, temperature, chunk_tokens):
        N, V, dev = hidden.shape[0], weight.shape[0], hidden.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        # the PyTorch reference (CPU) makes float32 temporaries per row: keep a chunk within its row budget
        C = chunk_tokens if _use_triton(hidden) else min(chunk_tokens, _rows_budget(V))
        logp, H, m, log_d = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(4))
        w = weight.to(dt)  # fp32 master weight under autocast -> one bf16 copy (a no-op otherwise)
        with torch.autocast(dev, enabled=False):
            for i in range(0, N, C):
                s = slice(i, i + C)
                z = hidden[s].to(dt) @ w.T                        # (C, V) dt
                logp[s], H[s], m[s], log_d[s] = _forward_rows(z, y[s], temperature)
        ctx.save_for_backward(hidden, weight, y, m, log_d, H)     # weight itself, never a copy
        ctx.temperature, ctx.chunk_tokens, ctx.dtype = temperature, C, dt
        return logp, H

    @staticmethod
    def backward(ctx, g, h):
        hidden, weight, y, m, log_d, H = ctx.saved_tensors
        N, C, dt = hidden.shape[0], ctx.chunk_tokens, ctx.dtype
        need_dh, need_dw = ctx.needs_input_grad[:2]
        dh = torch.empty_like(hidden) if need_dh else None        # (N, D)
        dw = torch.zeros_like(weight) if need_dw else None        # (V, D) weight's dtype
        w = weight.to(dt)                                         # as in forward
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, N, C):
                s = slice(i, i + C)
                hs = hidden[s].to(dt)                             # (C, D)
                z = hs @ w.T                                      # (C, V) dt: the forward's logits, recomputed
                dz = _backward_rows(z, y[s], m[s], log_d[s], H[s], None if g is None else g[s],
                                    None if h is None else h[s], ctx.temperature, out=z)  # in place
                if need_dh:
                    dh[s] = dz @ w                                # (C, D) into the hidden's dtype
                if need_dw and dw.dtype == dt:
                    dw.addmm_(dz.T, hs)                           # (V, D) one rounding per chunk
                elif need_dw:
                    dw += dz.T @ hs                               # fp32 master: sum chunks in fp32
        return dh, dw, None, None, None


def lm_head_logprobs_and_entropy(hidden, weight, targets, temperature=1.0, chunk_tokens=4096):
    """`logprobs_and_entropy(hidden @ weight.T, targets, temperature)` without the logits.

    hidden (N, D) (or (..., D)), weight (V, D) the lm_head weight (no bias), targets (N,) as in
    `logprobs_and_entropy`. Logits exist for `chunk_tokens` tokens at a time (on the CPU reference
    path at most its row budget, ~4 MB of float32 temporaries), in the autocast dtype under autocast,
    else the hidden's (an fp32 hidden state under bf16 autocast gives bf16 logits, never fp32 ones);
    the backward recomputes them in that same dtype (one extra matmul) and overwrites them with their
    gradient.
    d(weight) accumulates over chunks in the weight's dtype (cuBLAS sums each chunk in float32,
    then one rounding per chunk): a float32 buffer would cost V·D·4 bytes, more than a chunk of
    logits. Under FSDP2 call it inside an FSDP-managed module's forward, so `weight` is the
    unsharded tensor; it is saved as is, never copied.
    """
    D = hidden.shape[-1]
    y = targets.reshape(-1).clamp_min(0)                          # (N,)
    logp, H = _LMHeadLogprobsEntropy.apply(hidden.reshape(-1, D), weight, y, float(temperature),
                                           int(chunk_tokens))
    return logp.view(hidden.shape[:-1]), H.view(hidden.shape[:-1])
