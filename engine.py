"""Local generation for rl.py's rollouts, evaluate.py's local generation and bench/: prompts (token ids) in,
completions (token ids), finished / truncated flags and the sampler's log-probs out.

    outs = engine.generate(model, prompts, max_new_tokens=4096, stop_ids=[...], pad_id=0,
                           temperature=1.0, top_p=1.0, batch_size=64, seed=0, vocab_size=len(tok))
    outs[i] = {"completion_ids": [...], "logp": [...], "log_kept": [...], "finished": bool, "truncated": bool}

`completion_ids` ends with the stop token when `finished`; `logp[t]` = log softmax(z_t / τ)[y_t], the log-probability
of the sampled token under the temperature-scaled distribution over every lm_head row, before top-p (the same
quantity rl.py recomputes as log π_old, so |sampler − π_old| measures the sampler's numerical gap);
`log_kept[t]` = log C_t, the log of the mass the draw was restricted to (the top-p nucleus of the ids below
vocab_size), so logp[t] - log_kept[t] is the log-prob under the distribution actually sampled (log_kept is exactly 0
when nothing is cut). temperature 0 is greedy (logp is then log softmax(z_t)[y_t], log_kept 0).

How it is fast (docs/perf.md, "How engine.py decodes", says why): 1. under FSDP2 the weights are gathered
once (generation_view) and no collective runs while decoding; 2. a static KV cache per call, attention over
its first Lb columns only; 3. on CUDA the decode step (sampling included) is a CUDA graph per (batch bucket,
length bucket), on the CPU the same code runs eagerly; 4. finished rows leave the batch, waiting prompts
take their slots, live rows are compacted; 5. sampling is a pure function of (seed, row id, token index) and
the logits (sampler.py), so the tokens do not depend on batching or the number of ranks (up to the logits'
own rounding across batch shapes).

The decode forward (`Decoder.layer`) is written out for the Llama family rl.py trains (Llama, Qwen2, Qwen3, Mistral
with full attention) and calls the model's own projections, norms, MLP and RoPE; only attention over the static cache
is ours (`decode_attention`, `prefill_attention`, the backend logged once per process). Every other architecture
(hybrid Mamba models such as GraniteMoeHybrid, sliding-window or soft-capped models, remote code) takes the simple
path, logged once: the model's own forward and cache, static batches, the same sampler and stop checks. How another
backend (vLLM, SGLang) would plug in behind `generate`: docs/design.md §1.
"""
import math
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import sampler

# Batch buckets (×1.5 steps: at most 1.5× wasted rows between compactions) and the default length bucket.
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
LEN_BUCKET = 256
DIRECT_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
last_call = {}  # the last direct-path generate(): rows, capacity, graphs captured, capture seconds (bench/)


# --- 1. weights without collectives ---------------------------------------------------------------

def _set(module, name, t, kind):
    """module's parameter or buffer `name` (dotted) becomes the tensor t (kind: "_parameters" or "_buffers")."""
    mod, _, leaf = name.rpartition(".")
    getattr(module.get_submodule(mod), kind)[leaf] = t


def plain_copy(hf, dtype=None):
    """A module of hf's class whose parameters and buffers are hf's own tensors (aliases: no copy), or
    copies cast to `dtype` when given. Built on the meta device, so nothing is initialised twice."""
    with torch.device("meta"):
        view = type(hf)(hf.config)
    cast = {}
    for name, p in hf.named_parameters(remove_duplicate=False):  # tied weights: both names, one tensor
        if id(p) not in cast:
            cast[id(p)] = p.detach() if dtype is None else p.detach().to(dtype)
        _set(view, name, nn.Parameter(cast[id(p)], requires_grad=False), "_parameters")
    for name, b in hf.named_buffers(remove_duplicate=False):
        _set(view, name, b, "_buffers")
    view.generation_config = hf.generation_config
    return view.eval().requires_grad_(False)


@contextmanager
def generation_view(model, dtype=None):
    """Yield a plain Hugging Face module to decode from; `model` is a Policy or HF model, FSDP2 or not.

    FSDP2: unshard every FSDP module once (one all-gather per layer per rollout), yield a module whose
    parameters alias the unsharded tensors (already in the FSDP compute dtype), reshard on exit.
    One process: the model itself, or, when its weights are not in `dtype` (fp32 master weights,
    bf16 compute), a copy cast to `dtype`, so that decoding reads half the bytes and needs no autocast.
    """
    from torch.distributed.fsdp import FSDPModule
    hf = getattr(model, "hf", model)
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    was_training = model.training
    model.eval()
    try:
        if fsdp:
            for m in fsdp:
                m.unshard()
            yield plain_copy(hf)
        elif dtype is not None and next(hf.parameters()).dtype != dtype:
            yield plain_copy(hf, dtype)
        else:
            yield hf
    finally:
        for m in fsdp:
            m.reshard()
        model.train(was_training)


# --- 2-3. the direct decode forward over a static KV cache (Llama family) -------------------------

def direct_support(hf):
    """None if the direct forward handles this model, else the reason it does not."""
    cfg = hf.config
    if cfg.model_type not in DIRECT_FAMILIES:
        return f"model_type {cfg.model_type!r} (direct decode: {', '.join(DIRECT_FAMILIES)})"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window layers"
    if getattr(cfg, "sliding_window", None) and cfg.model_type == "mistral":
        return "sliding-window attention"
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None):
        return "soft-capped logits"
    inner = getattr(hf, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "unexpected module layout"
    return None


def decode_attention(q, K, V, mask, scale):
    """One new query per row against the cache: q (B, H, 1, hd), K, V (B, KV, Lb, hd), mask (B, 1, 1, Lb) bool
    (True: a key the row may see) -> (B, H, 1, hd).

    The G = H / KV query heads that share a KV head are folded into the query length, q -> (B, KV, G, hd)
    (head h reads KV head h // G, as enable_gqa's repeat_interleave does): each KV head is read once for its
    G queries, and a fused kernel takes the mask (docs/perf.md, "How engine.py decodes": which kernel)."""
    B, H, _, hd = q.shape
    KV = K.shape[1]
    o = F.scaled_dot_product_attention(q.reshape(B, KV, H // KV, hd), K, V, attn_mask=mask, scale=scale)
    return o.reshape(B, H, 1, hd)  # (B, KV, G, hd) -> (B, H, 1, hd)


def prefill_attention(q, k, v, scale):
    """Causal self-attention over right-padded prompts: q (B, H, P, hd), k, v (B, KV, P, hd) -> (B, H, P, hd).

    No mask: a prompt's tokens sit at columns [0, len), so the causal rule alone keeps every real query
    on real keys (the pad queries past len see pads too, but nothing reads their outputs, and the cache
    columns they write are masked until decoding overwrites them); is_causal + enable_gqa is flash
    attention's own form (docs/perf.md)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def attention_route(n_heads, n_kv, head_dim, dtype, device, rows=2, Lb=LEN_BUCKET, P=LEN_BUCKET):
    """The SDPA backend PyTorch picks on `device` for the engine's exact decode and prefill layouts at these
    head counts and dtype (torch._fused_sdp_choice on tensors laid out as the step's), e.g.
    'decode EFFICIENT_ATTENTION, prefill FLASH_ATTENTION'. The selection reads head counts, head size,
    dtype, strides and the mask's shape, not the sizes of the batch or the cache."""
    from torch.nn.attention import SDPBackend
    x = lambda *s: torch.zeros(s, dtype=dtype, device=device)  # noqa: E731
    cache = x(rows, n_kv, 2 * Lb, head_dim)[:, :, :Lb]  # a column slice of the cache, as the step reads it
    mask = torch.ones(rows, 1, 1, Lb, dtype=torch.bool, device=device)
    names = {int(b.value): name for name, b in SDPBackend.__members__.items()}
    dec = torch._fused_sdp_choice(x(rows, n_kv, n_heads // n_kv, head_dim), cache, cache, mask, 0.0, False,
                                  scale=None)
    k = x(rows, n_kv, P, head_dim)
    pre = torch._fused_sdp_choice(x(rows, n_heads, P, head_dim), k, k, None, 0.0, True, scale=None, enable_gqa=True)
    return f"decode {names[int(dec)]}, prefill {names[int(pre)]}"


class Decoder:
    """The decode state of one generate() call: a static KV cache, per-slot device state, CUDA graphs."""

    def __init__(self, hf, rows, capacity, temperature, top_p, seed, graphs, vocab=None):
        cfg, inner = hf.config, hf.model
        self.hf, self.inner, self.layers = hf, inner, list(inner.layers)
        a = self.layers[0].self_attn
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim
        self.rope = sys.modules[type(a).__module__].apply_rotary_pos_emb  # the model's own RoPE
        self.temperature, self.top_p, self.vocab = temperature, top_p, vocab
        dev, self.dtype = inner.embed_tokens.weight.device, inner.embed_tokens.weight.dtype
        self.device, self.rows, self.capacity = dev, rows, capacity
        shape = (len(self.layers), rows, self.n_kv, capacity, self.head_dim)  # (L, rows, KV, capacity, hd)
        self.K, self.V = (torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(2))
        # per-slot state, read and written by the decode step (static addresses, for the graphs)
        self.tok, self.lens, self.t, self.row = (torch.zeros(rows, dtype=torch.long, device=dev) for _ in range(4))
        self.seed = torch.tensor([seed], dtype=torch.long, device=dev)
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.graphs = {} if graphs else None
        self.pool = None
        self.capture_s = 0.0  # seconds spent warming up and capturing graphs

    # one decoder layer; `attend(l, q, k, v)` is attention against the cache (decode) or the prompt (prefill)
    def layer(self, l, x, cos, sin, attend):
        layer = self.layers[l]
        a = layer.self_attn
        B, S, _ = x.shape
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(B, S, -1, self.head_dim)  # (B, S, H, hd)
        k = a.k_proj(h).view(B, S, -1, self.head_dim)  # (B, S, KV, hd)
        v = a.v_proj(h).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, KV, S, hd)
        if hasattr(a, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, H|KV, S, hd)
        o = attend(l, q, k, v)  # (B, H, S, hd)
        x = x + a.o_proj(o.transpose(1, 2).reshape(B, S, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, x):
        return self.hf.lm_head(self.inner.norm(x)).float()  # (B, V)

    @torch.no_grad()
    def prefill(self, prompts, slots, row_ids):
        """Right-padded prompts (lists of ids) -> their K, V written into `slots`; the first token of
        each sampled (t = 0). Returns (first tokens, their log-probs, log C) as lists."""
        B, P = len(prompts), max(len(p) for p in prompts)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        ids = common.pad_right(prompts, device=self.device)[0]  # (B, P)
        pos = torch.arange(P, device=self.device).expand(B, P)  # (B, P)
        slot_idx = torch.tensor(slots, device=self.device)

        def attend(l, q, k, v):  # causal, no mask: see prefill_attention
            self.K[l, :, :, :P].index_copy_(0, slot_idx, k)
            self.V[l, :, :, :P].index_copy_(0, slot_idx, v)
            return prefill_attention(q, k, v, self.layers[l].self_attn.scaling)

        x = self.inner.embed_tokens(ids)  # (B, P, D)
        cos, sin = self.inner.rotary_emb(x, pos)
        for l in range(len(self.layers)):
            x = self.layer(l, x, cos, sin, attend)
        z = self.logits(x[torch.arange(B, device=self.device), lens - 1])  # (B, V) at each prompt's last token
        rows = torch.tensor(row_ids, device=self.device)
        nxt, logp, kept = sampler.sample_next(z, self.temperature, self.top_p, self.seed, rows, torch.zeros_like(rows),
                                              self.vocab)
        self.tok[slot_idx], self.lens[slot_idx], self.t[slot_idx], self.row[slot_idx] = nxt, lens, 1, rows
        return nxt.tolist(), logp.tolist(), kept.tolist()

    def step(self, Bb, Lb, hist_tok, hist_logp, hist_kept):
        """One decode step for slots [0, Bb), attention over cache columns [0, Lb): all device ops on
        static buffers, so it can be captured in a CUDA graph."""
        tok, lens = self.tok[:Bb], self.lens[:Bb]  # (Bb,)
        x = self.inner.embed_tokens(tok[:, None])  # (Bb, 1, D)
        cos, sin = self.inner.rotary_emb(x, lens[:, None])
        mask = (torch.arange(Lb, device=self.device)[None, :] <= lens[:, None])[:, None, None, :]  # (Bb,1,1,Lb)
        at = lens[:, None, None, None].expand(Bb, self.n_kv, 1, self.head_dim)  # write column = position

        def attend(l, q, k, v):
            K, V = self.K[l, :Bb], self.V[l, :Bb]  # (Bb, KV, capacity, hd)
            K.scatter_(2, at, k)
            V.scatter_(2, at, v)
            return decode_attention(q, K[:, :, :Lb], V[:, :, :Lb], mask, self.layers[l].self_attn.scaling)

        for l in range(len(self.layers)):
            x = self.layer(l, x, cos, sin, attend)
        nxt, logp, kept = sampler.sample_next(self.logits(x[:, -1]), self.temperature, self.top_p, self.seed,
                                              self.row[:Bb], self.t[:Bb], self.vocab)
        self.tok[:Bb] = nxt
        self.lens[:Bb] += 1
        self.t[:Bb] += 1
        c = self.col.expand(Bb)[:, None]  # (Bb, 1) this step's column of the (rows, k) histories
        for hist, x in zip((hist_tok, hist_logp, hist_kept), (nxt, logp, kept)):
            hist[:Bb].scatter_(1, c, x[:, None])
        self.col += 1

    def run(self, Bb, Lb, *hist):
        """step(Bb, Lb, *hist), replayed from a CUDA graph captured on first use of (Bb, Lb) when graphs are on."""
        if self.graphs is None:
            return self.step(Bb, Lb, *hist)
        g = self.graphs.get((Bb, Lb))
        if g is None:
            t0 = time.perf_counter()
            state = [x.clone() for x in (self.tok, self.lens, self.t, self.col, *hist)]
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm-up (allocator, lazy inits) outside the graph
                self.step(Bb, Lb, *hist)
            torch.cuda.synchronize()
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            # capture_begin / capture_end: `with torch.cuda.graph(...)` would empty the caching allocator before
            # every capture (up to one per bucket pair of a call), then cudaMalloc afresh what the cache had held
            with torch.cuda.stream(s):
                g.capture_begin(pool=self.pool)
                try:
                    self.step(Bb, Lb, *hist)
                finally:
                    g.capture_end()
            torch.cuda.current_stream().wait_stream(s)
            for x, saved in zip((self.tok, self.lens, self.t, self.col, *hist), state):
                x.copy_(saved)  # undo the warm-up step (its K/V write is overwritten by the real one)
            self.graphs[(Bb, Lb)] = g
            self.capture_s += time.perf_counter() - t0
        g.replay()

    def move(self, src, dst, Lb):
        """Compaction: live rows in slots `src` move to free slots `dst` (K, V columns [0, Lb) and state)."""
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        self.K[:, d, :, :Lb] = self.K[:, s, :, :Lb]
        self.V[:, d, :, :Lb] = self.V[:, s, :, :Lb]
        for x in (self.tok, self.lens, self.t, self.row):
            x[d] = x[s]


# --- 4. the host loop: slots, refill, stop checks every k steps, compaction ------------------------

def _bucket(n, buckets):
    return next((b for b in buckets if b >= n), buckets[-1])


def _validate(prompts, max_new, temperature, top_p, batch_size, check_every, vocab_size=None):
    if not all(isinstance(n, int) and n >= 1 for n in max_new):
        raise ValueError("max_new_tokens must be >= 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("engine.generate: empty prompt (no token ids)")
    if temperature < 0 or not 0 < top_p <= 1 or batch_size < 1 or check_every < 1:
        raise ValueError(f"engine.generate: need temperature >= 0, 0 < top_p <= 1, batch_size >= 1, check_every >= 1 "
                         f"(got {temperature}, {top_p}, {batch_size}, {check_every})")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"engine.generate: vocab_size must be >= 1 (got {vocab_size})")


def free_memory(dev):
    """Bytes a new allocation on CUDA device `dev` can take: the driver's free memory plus what PyTorch's
    caching allocator holds reserved but unused (freed tensors it keeps for reuse, e.g. the previous
    rollout's cache or the optimizer step's temporaries), which mem_get_info counts as used."""
    return torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)


_logged = set()


def _log_once(msg):
    if msg not in _logged:
        _logged.add(msg)
        print(f"engine: {msg}", file=sys.stderr, flush=True)


def _cache_rows(hf, rows, capacity, kv_budget):
    """The rows the static cache gets: `rows`, or on CUDA as many as fit into kv_budget of the free memory."""
    dev = hf.model.embed_tokens.weight.device
    if dev.type != "cuda":
        return rows
    cfg = hf.config
    per_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hf.model.layers[0].self_attn.head_dim \
        * capacity * hf.model.embed_tokens.weight.element_size()
    fit = int(free_memory(dev) * kv_budget // per_row)
    if fit < rows:
        _log_once(f"KV cache for {rows} rows x {capacity} tokens does not fit; decoding {max(fit, 1)} rows at a time")
        rows = max(fit, 1)
    return rows


def _log_attention(dec, dev):
    """The SDPA backend of the decode and prefill layouts, logged once per (device, dtype, head counts)."""
    key = ("attention", dev.type, dec.dtype, dec.n_heads, dec.n_kv, dec.head_dim)
    if key not in _logged:
        _logged.add(key)
        _log_once(f"attention on {dev.type} {dec.dtype}: {attention_route(*key[3:], dec.dtype, dev)}")


class _Completions:
    """The host side of one generate() call: each prompt's (token, log-prob, log C) as they arrive, and its
    output dict once it hits a stop token or its limit."""

    def __init__(self, n, max_new, stop_set, progress):
        self.max_new, self.stop_set, self.progress = max_new, stop_set, progress
        self.got, self.out = [[] for _ in range(n)], [None] * n

    def take(self, i, toks, logps, kepts):
        """Append new tokens of prompt i up to its stop token or limit; True when it is done."""
        for x in zip(toks, logps, kepts):
            self.got[i].append(x)
            fin = x[0] in self.stop_set  # finished: it ends with a stop token; else truncated: it hit its limit
            if fin or len(self.got[i]) >= self.max_new[i]:
                ids, logp, kept = (list(c) for c in zip(*self.got[i]))
                self.out[i] = {"completion_ids": ids, "logp": logp, "log_kept": kept, "finished": fin,
                               "truncated": not fin}
                if self.progress is not None:
                    self.progress.update(1)
                return True
        return False


def _compact(dec, slot_row, occupied, Bb, target, capacity, len_bucket):
    """Move the live rows of slots at or past `target` into free slots below it (K, V and state), when the
    smallest bucket that holds them, `target`, is below the current one Bb; returns the batch bucket."""
    if target >= Bb:
        return Bb
    src = [s for s in occupied if s >= target]
    dst = [s for s in range(target) if slot_row[s] < 0][:len(src)]
    Lb_all = min(capacity, math.ceil((int(dec.lens[:Bb].max()) + 1) / len_bucket) * len_bucket)
    dec.move(src, dst, Lb_all)
    for s_, d_ in zip(src, dst):
        slot_row[d_], slot_row[s_] = slot_row[s_], -1
    return target


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_p=1.0, batch_size=64,
             seed=0, row_ids=None, progress=None, check_every=16, len_bucket=LEN_BUCKET, batch_buckets=BATCH_BUCKETS,
             graphs=None, simple=False, kv_budget=0.85, vocab_size=None):
    """Sample one completion per prompt (a list of token ids). Returns one dict per prompt, in order
    (see the module docstring). max_new_tokens: an int, or one int per prompt. row_ids: the id hashed
    into each prompt's sampling noise (default 0..n-1; rl.py passes global sample indices). vocab_size:
    the tokenizer's size len(tok); ids at or past it (embedding rows with no token) are never sampled
    (default: every row of the lm_head may be). graphs: CUDA graphs on/off (default: on when the model is on
    CUDA). simple=True forces the simple path (the model's own forward and cache) that non-Llama-family
    models take; with check_every=1 it is the plain eager KV-cache loop (bench/bench_rollout.py's baseline)."""
    n = len(prompts)
    max_new = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
    _validate(prompts, max_new, temperature, top_p, batch_size, check_every, vocab_size)
    if n == 0:
        return []
    row_ids = list(range(n)) if row_ids is None else list(row_ids)
    stop_set = set(int(s) for s in stop_ids)
    hf = getattr(model, "hf", model)
    why = "simple=True" if simple else direct_support(hf)
    if why is not None:
        if not simple:
            _log_once(f"{type(hf).__name__}: {why}; using the simple path (model's own cache, static batches)")
        return _generate_simple(hf, prompts, max_new, stop_set, pad_id, temperature, top_p, batch_size, seed,
                                row_ids, progress, check_every, vocab_size)

    dev = hf.model.embed_tokens.weight.device
    graphs = dev.type == "cuda" if graphs is None else graphs
    k = check_every
    capacity = math.ceil((max(len(p) for p in prompts) + max(max_new) + k) / len_bucket) * len_bucket
    rows = _cache_rows(hf, min(batch_size, n), capacity, kv_budget)
    dec = Decoder(hf, rows, capacity, temperature, top_p, seed, graphs, vocab_size)
    _log_attention(dec, dev)
    # (rows, k) each: the tokens, log-probs and log C of the last k decode steps, read once per k steps
    hist = [torch.zeros(rows, k, dtype=dt, device=dev) for dt in (torch.long, torch.float32, torch.float32)]

    done = _Completions(n, max_new, stop_set, progress)
    slot_row = [-1] * rows  # which prompt each slot decodes (-1: free)
    queue = list(range(n))
    refill_min = max(1, rows // 8)  # prefill waiting prompts in groups, not one by one
    buckets = [b for b in batch_buckets if b < rows] + [rows]
    while True:
        free = [s for s in range(rows) if slot_row[s] < 0]
        live = rows - len(free)
        if queue and free and (len(free) >= refill_min or live == 0):
            new, queue = queue[:len(free)], queue[len(free):]
            budget = max(1, 8192 // max(len(prompts[i]) for i in new))  # prefill rows per forward
            for j in range(0, len(new), budget):
                grp = new[j:j + budget]
                slots = free[j:j + len(grp)]
                first, first_lp, first_kp = dec.prefill([prompts[i] for i in grp], slots, [row_ids[i] for i in grp])
                for i, s, x, lp, kp in zip(grp, slots, first, first_lp, first_kp):
                    slot_row[s] = -1 if done.take(i, [x], [lp], [kp]) else i
            continue
        if live == 0:
            break
        occupied = [s for s in range(rows) if slot_row[s] >= 0]
        Bb = _bucket(occupied[-1] + 1, buckets)
        if not queue:  # compaction: move live rows into the smallest bucket that holds them
            Bb = _compact(dec, slot_row, occupied, Bb, _bucket(live, buckets), capacity, len_bucket)
        free_in = [s for s in range(Bb) if slot_row[s] < 0]
        if free_in:  # idle slots decode garbage from position 0, so they never outgrow the cache
            dec.lens[torch.tensor(free_in, device=dev)] = 0
        Lb = min(capacity, math.ceil((int(dec.lens[:Bb].max()) + k) / len_bucket) * len_bucket)
        dec.col.zero_()
        for _ in range(k):
            dec.run(Bb, Lb, *hist)
        ht, hl, hk = (h[:Bb].tolist() for h in hist)  # the one host sync per k steps
        for s in range(Bb):
            i = slot_row[s]
            if i >= 0 and done.take(i, ht[s], hl[s], hk[s]):
                slot_row[s] = -1
    last_call.update(rows=rows, capacity=capacity, graphs=len(dec.graphs or ()), capture_s=dec.capture_s)
    return done.out


def _generate_simple(hf, prompts, max_new, stop_set, pad_id, temperature, top_p, batch_size, seed, row_ids,
                     progress, check_every, vocab_size=None):
    """The model's own forward and KV cache (any architecture, e.g. hybrid Mamba caches), static batches
    of left-padded prompts, the same sampler; stops checked every `check_every` steps."""
    dev = next(hf.parameters()).device
    seed_t = torch.tensor([seed], dtype=torch.long, device=dev)
    done = _Completions(len(prompts), max_new, stop_set, progress)
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        limit = max_new[b:b + batch_size]
        B, L = len(batch), max(len(p) for p in batch)
        ids = torch.full((B, L), pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((B, L), dtype=torch.long, device=dev)
        for i, p in enumerate(batch):
            ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p, device=dev), 1
        pos = common.positions_from_mask(mask)  # (B, L)
        rows = torch.tensor(row_ids[b:b + batch_size], device=dev)
        stop = torch.tensor(sorted(stop_set) or [-1], device=dev)
        ended = torch.zeros(B, dtype=torch.bool, device=dev)
        limit_t = torch.tensor(limit, device=dev)
        steps, cache, cur = [], None, ids
        for t in range(max(limit)):
            o = hf(input_ids=cur, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
            cache = o.past_key_values
            nxt, lp, kp = sampler.sample_next(o.logits[:, -1].float(), temperature, top_p, seed_t, rows,
                                              torch.full_like(rows, t), vocab_size)
            steps.append((nxt, lp, kp))
            ended = ended | torch.isin(nxt, stop) | (t + 1 >= limit_t)
            cur, pos = nxt[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if (t + 1) % check_every == 0 and bool(ended.all()):
                break
        toks, logps, kepts = (torch.stack(x, 1).tolist() for x in zip(*steps))  # (B, steps)
        for i in range(B):  # every row ended: its tokens up to its stop token or its limit
            done.take(b + i, toks[i], logps[i], kepts[i])
    return done.out
