"""The sampler of engine.py: which token a decode step draws, a pure function of the logits and (seed, row, t).

  sample_next   z (B, V) logits -> (token, log π(token), log C): an inverse CDF over float64 running sums
                of the kept weights, at one hashed 53-bit uniform per (seed, row id, token index)
  kept_weights  the distribution drawn from: softmax(z / τ) restricted to K, the top-p nucleus of the ids
                below the tokenizer's size, as weights in the CDF's order
  drawn_probabilities   the exact probability the sampler gives each token, by enumerating its uniforms
                (tests/test_engine.py and bench/bench_sampler.py measure the total variation with it)

No .item(), no data-dependent shape, no host tensor: a decode step that calls sample_next stays capturable
in a CUDA graph.

The sampler draws the distribution it claims, to 3e-12 in total variation. Measured by exact
enumeration (drawn_probabilities: which token each of the 2^53 uniforms selects, bisected per CDF
position) on 152,064-token rows of logits 2·N(0, 1) (entropy 9.9 nats) and 3·N(0, 1), at top-p 1 and
0.95 (`python bench/bench_sampler.py`): TV 3.2e-12, 1.3e-12, 3.2e-12, 3.1e-13, and every token of
nonzero probability is drawn by some uniform (any token whose probability exceeds about 2^-52 is; the
tokens below carry less than V·2^-52 = 3e-11 of mass in all). A float32 CDF with one 24-bit uniform per
step drew the same rows 1.5e-3, 7.7e-4, 1.3e-3, 1.9e-4 away, and at top-p 1 left 6,699 (σ = 2) and
53,905 (σ = 3) tokens, 1.4e-4 and 5.0e-4 of the mass, to no uniform at all.
Cost per token (one row, one step) on one CPU core, same script, fastest of 10-20 calls on 8 rows, over
five runs on a 2-core machine shared with other jobs: at top-p 1 the float32 CDF 0.49-1.33 ms, the
float64 CDF 0.60-1.14 ms (no faster or slower beyond the noise: twice the bytes per logit, but its
log-prob comes out of the same buffer, with no log-softmax pass); at top-p 0.95 12.6-31 ms and
17-40 ms, both dominated by the sort. On a GPU, on paper (memory-bound; bytes moved per logit in eager
PyTorch): the float64 CDF ~75-90 B (to float64, divide, max, subtract and exp in place, sum, cumsum),
the float32 CDF ~40 B: at 64 rows x 152k, ~0.26 ms vs ~0.12 ms per decode step on an H100 (3.35 TB/s),
beside ~4.5 ms for reading a 7B model's bf16 weights once; top-p adds the sort to both.
The other exact candidate, an exponential race (Gumbel-max: argmin_v E_v / π(v), E_v = -log u_v with a
hashed 53-bit uniform per (row, t, token)), needs no sort and no running sum at top-p 1 but hashes V
numbers per row and step: 5.2-13.9 ms per token on the CPU (same runs); unfused on a GPU, ~60 elementwise
int64 / float64 ops x 16 B per logit (~10 GB, ~3 ms per step at 64 x 152k, the size of the decode step
itself) unless written as one fused kernel. Its distribution cannot be enumerated (2^(53 V) joint
uniforms), and top-p needs the sort anyway. So: the float64 CDF.

Embedding rows past the tokenizer are never sampled. Real checkpoints pad the lm_head (R1-Distill-Qwen-7B
152,064 rows for 151,665 tokens; Qwen3 151,936 for 151,669): an id there decodes to nothing, so the
reward model, the graders and entropy.py would see a text without it while rl.py trains on its id.
Counting and warning would leave that mismatch in the data; masking costs only the mass a trained model
puts on rows it never saw as targets. So generate(vocab_size=len(tok)) zeroes those rows before
top-p, and the one distribution stays stated: π_old (rl.py's recomputation) is softmax(z / τ) over
every row, the draw is from π_old restricted to K (the nucleus of the valid ids) and renormalised, and
log_kept = log C measures the difference (rl.py logs its mean as kept_gap next to sampler_gap).
"""
import torch

_M32 = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow (split c into 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values < 2^32."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seed, row, t):
    """(B,) float64 u = k / 2^53 in [0, 1), k a 53-bit integer built from two 32-bit hashes of (seed, row, t)
    that take the three in different orders (neither half is a function of the other). seed (1,), row, t (B,)
    int64."""
    hi = _mix32(_mix32(_mix32(seed) ^ row) ^ t)
    lo = _mix32(_mix32(_mix32(seed ^ 0x5BD1E995) ^ t) ^ row)
    return ((hi << 21) | (lo >> 11)).double() / float(1 << 53)


def kept_weights(z, temperature, top_p, vocab=None):
    """The distribution the sampler draws from, as float64 weights in the order its CDF runs.

    z (B, V) logits -> (w, order, log_total): w (B, V) = exp(z/τ - max z/τ) on the tokens that may be
    drawn and 0 on the rest; order (B, V) the token id at each position (None: the positions are the ids);
    log_total (B,) = log Σ_v exp(z_v/τ - max z/τ) over all V ids, so that log π(v) = log w_v - log_total
    for a kept token, π = softmax(z / τ).
    May be drawn: an id below `vocab` (the tokenizer's size; embedding rows past it have no token) inside
    the top-p nucleus of those ids: ranked by probability, a token is kept while the mass ranked above it is
    below top_p times the mass of the valid ids. Equal logits are ranked as transformers'
    TopPLogitsWarper and vLLM rank them (an ascending stable sort, read from the top: the higher id first),
    so a tie on the boundary keeps the same members as theirs (up to their float32 rounding of the sums)."""
    V = z.shape[-1]
    order = None
    if top_p < 1.0:
        z, order = z.flip(-1).sort(dim=-1, descending=True, stable=True)  # (B, V) likeliest first; ties: higher id
        order = (V - 1) - order
    w = z.double()  # (B, V), one float64 buffer, updated in place
    if temperature != 1.0:
        w.div_(temperature)
    w.sub_(w.max(-1, keepdim=True).values).exp_()  # (B, V) exp(z/τ - max z/τ)
    log_total = w.sum(-1).log()  # (B,)
    if vocab is not None and vocab < V:
        if order is None:
            w[:, vocab:].zero_()  # (in place, no tensor made from Python data: capture-safe)
        else:
            w.mul_(order < vocab)
    if order is None:
        return w, None, log_total
    c = w.cumsum(-1)  # (B, V)
    above = torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], -1)  # (B, V) the mass ranked above each token
    return w.mul_(above < top_p * c[:, -1:]), order, log_total


def invert_cdf(c, u):
    """c (B, V) float64 running sums of the kept weights, u (B, Q) in [0, 1) -> (B, Q) the position j with
    c[j-1] <= u·c[-1] < c[j]: position j is drawn with probability (c[j] - c[j-1]) / c[-1], up to the
    rounding of c and of the product and the 2^-53 grid of u."""
    return torch.searchsorted(c, u * c[:, -1:], right=True).clamp(max=c.shape[-1] - 1)


def drawn_probabilities(z, temperature, top_p, vocab=None):
    """z (1, V) -> (V,) float64: the exact probability that sample_next draws each token when u runs over
    its grid k / 2^53 (no sampling: for each CDF position j, first[j] = the smallest k that invert_cdf sends
    to a position >= j, a monotone function of k, bisected for every j at once; position j gets
    first[j + 1] - first[j] of the 2^53 uniforms). tests/test_engine.py and bench/bench_sampler.py measure
    the sampler's total variation with it."""
    w, order, _ = kept_weights(z, temperature, top_p, vocab)
    c = w.cumsum(-1)  # (1, V), as sample_next builds it
    V = c.shape[-1]
    j = torch.arange(V + 1, device=z.device)
    lo, hi = torch.zeros_like(j), torch.full_like(j, 1 << 53)
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        up = invert_cdf(c, (mid.double() / float(1 << 53))[None, :])[0] >= j  # (V + 1,) uniform `mid` at or past j
        lo, hi = torch.where(up | (lo == hi), lo, mid + 1), torch.where(up, mid, hi)
    p = (lo[1:] - lo[:-1]).double() / float(1 << 53)  # (V,) per CDF position
    return p if order is None else torch.zeros_like(p).scatter_(0, order[0], p)


def sample_next(z, temperature, top_p, seed, row, t, vocab=None):
    """z (B, V) float32 logits -> (next token (B,), log π(token) (B,), log C (B,)), π = softmax(z / τ).

    τ = 0: argmax over the ids below `vocab`, log C = 0. Otherwise the token whose CDF interval holds
    u = uniforms(seed, row, t), over kept_weights: a draw from π restricted to the kept set K (the top-p
    nucleus of the tokenizer's ids) and renormalised, π(y) / C with C = Σ_{v in K} π(v). The reported
    log-prob is log π(y) over all V ids, before top-p and the vocabulary cut (what rl.py recomputes as
    log π_old); log π(y) - log C is the log-prob under the distribution actually sampled. log C is exactly
    0 when nothing is cut (top_p = 1 and no row past `vocab`)."""
    if temperature == 0:
        nxt = z[:, :vocab].argmax(-1)
        return nxt, torch.log_softmax(z, -1).gather(-1, nxt[:, None]).squeeze(-1), torch.zeros_like(z[:, 0])
    w, order, log_total = kept_weights(z, temperature, top_p, vocab)
    c = w.cumsum(-1)  # (B, V) the CDF over the kept tokens, unnormalised
    j = invert_cdf(c, uniforms(seed, row, t)[:, None])  # (B, 1) the drawn position
    nxt = (j if order is None else order.gather(-1, j)).squeeze(-1)
    logp = (w.gather(-1, j).squeeze(-1).log() - log_total).float()
    cut = top_p < 1.0 or (vocab is not None and vocab < z.shape[-1])
    log_kept = (c[:, -1].log() - log_total).clamp(max=0).float() if cut else torch.zeros_like(logp)
    return nxt, logp, log_kept
