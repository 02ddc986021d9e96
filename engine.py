"""Generation for rl.py's rollouts, evaluate.py's local generation and bench/: prompts (token ids) in,
completions (token ids), finished / truncated flags and the sampler's log-probs out.

    outs = engine.generate(model, prompts, max_new_tokens=4096, stop_ids=[...], pad_id=0,
                           temperature=1.0, top_p=1.0, batch_size=64, seed=0)
    outs[i] = {"completion_ids": [...], "logp": [...], "finished": bool, "truncated": bool}

`completion_ids` ends with the stop token when `finished`; `logp[t]` = log softmax(z_t / τ)[y_t], the
log-probability of the sampled token under the temperature-scaled distribution before top-p (the same
quantity rl.py recomputes as log π_old, so |sampler − π_old| measures the sampler's numerical gap).
temperature 0 is greedy (logp is then log softmax(z_t)[y_t]).

How it is fast (docs/design.md §1, issue 10). One decode step reads every weight once and the KV cache
of every live row, so a decode step is memory-bound: the engine spends its bytes on those reads only.
  1. Weights without collectives. Under FSDP2, `generation_view(policy)` all-gathers every layer ONCE
     (FSDPModule.unshard) and decodes through a plain module whose parameters ARE those unsharded bf16
     tensors (aliases, no second copy); no collective runs inside the decode loop, each rank decodes
     its own prompts at its own pace, and the ranks meet once, after the rollout (reshard).
  2. Static KV cache, allocated once per call: K, V of shape (layers, rows, kv_heads, capacity, head_dim),
     a row's token at position j stored at column j (rows are left-aligned: no padding inside the
     cache). Attention reads only the first Lb columns, Lb = the current length bucket (a multiple of
     --len-bucket above the longest live row), never the whole buffer.
  3. CUDA graphs (on CUDA): the decode step (embedding, every layer, lm_head, temperature, top-p,
     sampling, bookkeeping) is captured once per (batch bucket, length bucket) actually visited and
     replayed; the prefill runs eagerly. Graphs are captured per call, because FSDP2 re-allocates
     the unsharded weights every rollout (and a graph bakes in addresses).
  4. Finished rows leave the batch. The host looks at the device every `check_every` steps (one
     copy of the last k tokens); finished rows free their slot; waiting prompts are prefilled into
     free slots; when none wait, live rows are compacted into the next smaller batch bucket.
  5. Sampling is a pure function of (seed, row id, token index) and the logits: one uniform
     u = hash(seed, row, t) per row and step (a 32-bit integer hash computed on the device) picks
     the token by inverse CDF over the (top-p filtered) probabilities. So the tokens do not depend on
     the batch a row shares, its slot, compaction, the bucket, CUDA graphs or the number of ranks:
     rl.py passes each sample's global index as its row id, and a rollout on 8 ranks samples what
     one rank would (up to the logits' own floating-point differences between batch shapes).
On the CPU the same code runs without graphs, so the tests exercise the real logic.

The decode forward is written out here (`Decoder.layer`) for the Llama-family decoders that rl.py
trains: Llama, Qwen2, Qwen3, Mistral (full attention). It calls the model's own modules (projections,
norms, MLP, rotary embedding and apply_rotary_pos_emb from its modeling file), so the weights, the RoPE
variant and the MLP are the checkpoint's; only attention over the static cache is ours
(torch sdpa with a (rows, 1, q, Lb) mask). Every other architecture (hybrid Mamba models such as
GraniteMoeHybrid, sliding-window or soft-capped models, remote code) takes the simple path, with one
logged line: the model's own forward and cache, static batches, the same sampler and stop checks.

Attention route: a direct decode forward, not transformers' attention-function registry. Measured
(CPU, 28 layers = Qwen2.5-1.5B's depth at a tiny width, `TorchDispatchMode` op count per decode step):
transformers' forward with its DynamicCache 2,039 ops, with its StaticCache 2,256, our direct step
2,309 (sampling and bookkeeping included). Launch counts are alike, and under CUDA graphs they stop
mattering; the choice rests on what the rest costs. A registry attention function still runs inside
transformers' forward and cache, whose StaticCache keeps ONE cache position for the whole batch:
rows must share a left-padded layout, so a finished row can neither be refilled nor compacted away,
and attention spans the whole preallocated buffer. The direct step owns the cache layout (per-row
positions, rows left-aligned), reads only Lb columns, and is plain tensor code on static buffers
that torch.cuda.graph captures without torch.compile. The GPU throughput of both routes is still to
be measured (bench/bench_rollout.py prints `generate` with a static cache + compile beside the
engine; docs/perf.md).

Another backend (vLLM, SGLang) plugs in behind the same function: it receives the prompts as token ids
and must return, per prompt, the completion ids (stop token included), per-token log-probs of the
sampled tokens at temperature τ, and the finished / truncated flags; rl.py and evaluate.py need
nothing else (rl.py recomputes π_old itself).
`generate_api` (end of file) sends the same job to an OpenAI-compatible /completions server (vLLM,
SGLang) for evaluate.py --api-url: token-id prompts in, text, truncated flag and token count out.
"""
import math
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# Batch buckets (×1.5 steps: at most 1.5× wasted rows between compactions) and the default length bucket.
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
LEN_BUCKET = 256
DIRECT_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


# ------------------------------------------------------------------------------------------------
# Sampling: inverse CDF with one hashed uniform per (seed, row, t)

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
    """(B,) float32 in [0, 1): u = hash(seed, row, t) with 24 random bits. seed (1,), row, t (B,) int64."""
    h = _mix32(_mix32(_mix32(seed) ^ row) ^ t)
    return (h >> 8).float() / float(1 << 24)


def sample_next(z, temperature, top_p, seed, row, t):
    """z (B, V) float32 logits -> (next token (B,), its log-prob (B,) under softmax(z / τ)).

    τ = 0: argmax. Otherwise the token whose CDF interval holds u = hash(seed, row, t), over the
    probabilities softmax(z / τ) restricted to the top-p nucleus (the smallest set of most likely
    tokens whose mass reaches top_p), renormalised. The reported log-prob is before top-p."""
    if temperature == 0:
        nxt = z.argmax(-1)
        return nxt, torch.log_softmax(z, -1).gather(-1, nxt[:, None]).squeeze(-1)
    logp = torch.log_softmax(z / temperature, -1)  # (B, V)
    u = uniforms(seed, row, t)[:, None]  # (B, 1)
    if top_p < 1.0:
        p, idx = logp.exp().sort(-1, descending=True)  # (B, V) most likely first
        p = p * ((p.cumsum(-1) - p) < top_p)  # keep a token while the mass before it is < top_p
        c = p.cumsum(-1)
        j = torch.searchsorted(c, u * c[:, -1:], right=True).clamp(max=z.shape[-1] - 1)  # (B, 1)
        nxt = idx.gather(-1, j).squeeze(-1)
    else:
        c = logp.exp().cumsum(-1)  # (B, V)
        nxt = torch.searchsorted(c, u * c[:, -1:], right=True).clamp(max=z.shape[-1] - 1).squeeze(-1)
    return nxt, logp.gather(-1, nxt[:, None]).squeeze(-1)


# ------------------------------------------------------------------------------------------------
# 1. Weights without collectives

def _set(module, name, t, kind):
    mod, _, leaf = name.rpartition(".")
    m = module.get_submodule(mod) if mod else module
    if kind == "param":
        m._parameters[leaf] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
    else:
        m._buffers[leaf] = t


def plain_copy(hf, dtype=None):
    """A module of hf's class whose parameters and buffers are hf's own tensors (aliases: no copy), or
    copies cast to `dtype` when given. Built on the meta device, so nothing is initialised twice."""
    with torch.device("meta"):
        view = type(hf)(hf.config)
    cast = {}
    for name, p in hf.named_parameters(remove_duplicate=False):  # tied weights: both names, one tensor
        if id(p) not in cast:
            cast[id(p)] = p.detach() if dtype is None else p.detach().to(dtype)
        _set(view, name, cast[id(p)], "param")
    for name, b in hf.named_buffers(remove_duplicate=False):
        _set(view, name, b, "buffer")
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


# ------------------------------------------------------------------------------------------------
# 2-3. The direct decode forward over a static KV cache (Llama family)

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


class Decoder:
    """The decode state of one generate() call: a static KV cache, per-slot device state, CUDA graphs."""

    def __init__(self, hf, rows, capacity, temperature, top_p, seed, graphs):
        cfg, inner = hf.config, hf.model
        self.hf, self.inner, self.layers = hf, inner, list(inner.layers)
        a = self.layers[0].self_attn
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim
        self.rope = sys.modules[type(a).__module__].apply_rotary_pos_emb  # the model's own RoPE
        self.temperature, self.top_p = temperature, top_p
        dev = inner.embed_tokens.weight.device
        self.dtype = inner.embed_tokens.weight.dtype
        self.device, self.rows, self.capacity = dev, rows, capacity
        shape = (len(self.layers), rows, self.n_kv, capacity, self.head_dim)
        self.K = torch.zeros(shape, dtype=self.dtype, device=dev)  # (L, rows, kv_heads, capacity, hd)
        self.V = torch.zeros(shape, dtype=self.dtype, device=dev)
        # per-slot state, read and written by the decode step (static addresses, for the graphs)
        z = lambda dt: torch.zeros(rows, dtype=dt, device=dev)  # noqa: E731
        self.tok, self.lens, self.t, self.row = z(torch.long), z(torch.long), z(torch.long), z(torch.long)
        self.seed = torch.tensor([seed], dtype=torch.long, device=dev)
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.graphs = {} if graphs else None
        self.pool = None

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
        each sampled (t = 0). Returns (first tokens, their log-probs) as lists."""
        B, P = len(prompts), max(len(p) for p in prompts)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        ids = common.pad_right(prompts, device=self.device)[0]  # (B, P)
        pos = torch.arange(P, device=self.device).expand(B, P)  # (B, P)
        valid = pos < lens[:, None]  # (B, P)
        mask = (pos[:, None, :] <= pos[:, :, None]) & valid[:, None, :]  # (B, P, P): causal, real keys only
        slot_idx = torch.tensor(slots, device=self.device)

        def attend(l, q, k, v):
            self.K[l, :, :, :P].index_copy_(0, slot_idx, k)
            self.V[l, :, :, :P].index_copy_(0, slot_idx, v)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.layers[l].self_attn.scaling,
                                                  enable_gqa=True)

        x = self.inner.embed_tokens(ids)  # (B, P, D)
        cos, sin = self.inner.rotary_emb(x, pos)
        for l in range(len(self.layers)):
            x = self.layer(l, x, cos, sin, attend)
        z = self.logits(x[torch.arange(B, device=self.device), lens - 1])  # (B, V) at each prompt's last token
        rows = torch.tensor(row_ids, device=self.device)
        nxt, logp = sample_next(z, self.temperature, self.top_p, self.seed, rows, torch.zeros_like(rows))
        self.tok[slot_idx], self.lens[slot_idx], self.t[slot_idx], self.row[slot_idx] = nxt, lens, 1, rows
        return nxt.tolist(), logp.tolist()

    def step(self, Bb, Lb, hist_tok, hist_logp):
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
            return F.scaled_dot_product_attention(q, K[:, :, :Lb], V[:, :, :Lb], attn_mask=mask,
                                                  scale=self.layers[l].self_attn.scaling, enable_gqa=True)

        for l in range(len(self.layers)):
            x = self.layer(l, x, cos, sin, attend)
        nxt, logp = sample_next(self.logits(x[:, -1]), self.temperature, self.top_p, self.seed,
                                self.row[:Bb], self.t[:Bb])
        self.tok[:Bb] = nxt
        self.lens[:Bb] += 1
        self.t[:Bb] += 1
        c = self.col.expand(Bb)[:, None]
        hist_tok[:Bb].scatter_(1, c, nxt[:, None])
        hist_logp[:Bb].scatter_(1, c, logp[:, None])
        self.col += 1

    def run(self, Bb, Lb, hist_tok, hist_logp):
        """step(), replayed from a CUDA graph captured on first use of (Bb, Lb) when graphs are on."""
        if self.graphs is None:
            return self.step(Bb, Lb, hist_tok, hist_logp)
        g = self.graphs.get((Bb, Lb))
        if g is None:
            state = [x.clone() for x in (self.tok, self.lens, self.t, self.col, hist_tok, hist_logp)]
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm-up (allocator, lazy inits) outside the graph
                self.step(Bb, Lb, hist_tok, hist_logp)
            torch.cuda.current_stream().wait_stream(s)
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.step(Bb, Lb, hist_tok, hist_logp)
            for x, saved in zip((self.tok, self.lens, self.t, self.col, hist_tok, hist_logp), state):
                x.copy_(saved)  # undo the warm-up step (its K/V write is overwritten by the real one)
            self.graphs[(Bb, Lb)] = g
        g.replay()

    def move(self, src, dst, Lb):
        """Compaction: live rows in slots `src` move to free slots `dst` (K, V columns [0, Lb) and state)."""
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        self.K[:, d, :, :Lb] = self.K[:, s, :, :Lb]
        self.V[:, d, :, :Lb] = self.V[:, s, :, :Lb]
        for x in (self.tok, self.lens, self.t, self.row):
            x[d] = x[s]


# ------------------------------------------------------------------------------------------------
# 4. The host loop: slots, refill, stop checks every k steps, compaction

def _bucket(n, buckets):
    return next((b for b in buckets if b >= n), buckets[-1])


def _validate(prompts, max_new, temperature, top_p, batch_size, check_every):
    if not all(isinstance(n, int) and n >= 1 for n in max_new):
        raise ValueError("max_new_tokens must be >= 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("engine.generate: empty prompt (no token ids)")
    if temperature < 0 or not 0 < top_p <= 1 or batch_size < 1 or check_every < 1:
        raise ValueError(f"engine.generate: need temperature >= 0, 0 < top_p <= 1, batch_size >= 1, check_every >= 1 "
                         f"(got {temperature}, {top_p}, {batch_size}, {check_every})")


_logged = set()


def _log_once(msg):
    if msg not in _logged:
        _logged.add(msg)
        print(f"engine: {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_p=1.0, batch_size=64,
             seed=0, row_ids=None, progress=None, check_every=16, len_bucket=LEN_BUCKET, batch_buckets=BATCH_BUCKETS,
             graphs=None, simple=False, kv_budget=0.85):
    """Sample one completion per prompt (a list of token ids). Returns one dict per prompt, in order
    (see the module docstring). max_new_tokens: an int, or one int per prompt. row_ids: the id hashed
    into each prompt's sampling noise (default 0..n-1; rl.py passes global sample indices). graphs:
    CUDA graphs on/off (default: on when the model is on CUDA). simple=True forces the simple path
    (the model's own forward and cache) that non-Llama-family models take; with check_every=1 it is
    the plain eager KV-cache loop (bench/bench_rollout.py's baseline)."""
    n = len(prompts)
    max_new = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
    _validate(prompts, max_new, temperature, top_p, batch_size, check_every)
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
                                row_ids, progress, check_every)

    dev = hf.model.embed_tokens.weight.device
    graphs = dev.type == "cuda" if graphs is None else graphs
    k = check_every
    capacity = max(len(p) for p in prompts) + max(max_new) + k
    capacity = math.ceil(capacity / len_bucket) * len_bucket
    rows = min(batch_size, n)
    if dev.type == "cuda":  # fit the static cache into the free memory
        cfg = hf.config
        per_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hf.model.layers[0].self_attn.head_dim \
            * capacity * hf.model.embed_tokens.weight.element_size()
        fit = int(torch.cuda.mem_get_info(dev)[0] * kv_budget // per_row)
        if fit < rows:
            _log_once(f"KV cache for {rows} rows x {capacity} tokens does not fit; decoding {max(fit, 1)} rows at a time")
            rows = max(fit, 1)
    dec = Decoder(hf, rows, capacity, temperature, top_p, seed, graphs)
    hist_tok = torch.zeros(rows, k, dtype=torch.long, device=dev)
    hist_logp = torch.zeros(rows, k, dtype=torch.float32, device=dev)

    out = [None] * n
    toks, logps = [[] for _ in range(n)], [[] for _ in range(n)]
    slot_row = [-1] * rows  # which prompt each slot decodes (-1: free)
    queue = list(range(n))
    refill_min = max(1, rows // 8)  # prefill waiting prompts in groups, not one by one

    def finish(i, fin):
        nn_ = len(toks[i])
        out[i] = {"completion_ids": toks[i], "logp": logps[i], "finished": fin, "truncated": not fin and nn_ >= max_new[i]}
        if progress is not None:
            progress.update(1)

    def take(i, tok_list, logp_list):
        """Append new tokens of prompt i up to its stop token or limit; True when it is done."""
        for x, lp in zip(tok_list, logp_list):
            toks[i].append(x)
            logps[i].append(lp)
            if x in stop_set:
                finish(i, True)
                return True
            if len(toks[i]) >= max_new[i]:
                finish(i, False)
                return True
        return False

    while True:
        free = [s for s in range(rows) if slot_row[s] < 0]
        live = rows - len(free)
        if queue and free and (len(free) >= refill_min or live == 0):
            new = queue[:len(free)]
            del queue[:len(new)]
            budget = max(1, 8192 // max(len(prompts[i]) for i in new))  # prefill rows per forward
            for j in range(0, len(new), budget):
                grp = new[j:j + budget]
                slots = free[j:j + len(grp)]
                first, first_lp = dec.prefill([prompts[i] for i in grp], slots, [row_ids[i] for i in grp])
                for i, s, x, lp in zip(grp, slots, first, first_lp):
                    slot_row[s] = -1 if take(i, [x], [lp]) else i
            continue
        if live == 0:
            break
        occupied = [s for s in range(rows) if slot_row[s] >= 0]
        Bb = _bucket(occupied[-1] + 1, [b for b in batch_buckets if b < rows] + [rows])
        if not queue:  # compaction: move live rows into the smallest bucket that holds them
            target = _bucket(live, [b for b in batch_buckets if b < rows] + [rows])
            if target < Bb:
                src = [s for s in occupied if s >= target]
                dst = [s for s in range(target) if slot_row[s] < 0][:len(src)]
                Lb_all = min(capacity, math.ceil((int(dec.lens[:Bb].max()) + 1) / len_bucket) * len_bucket)
                dec.move(src, dst, Lb_all)
                for s_, d_ in zip(src, dst):
                    slot_row[d_], slot_row[s_] = slot_row[s_], -1
                Bb = target
        free_in = [s for s in range(Bb) if slot_row[s] < 0]
        if free_in:  # idle slots decode garbage from position 0, so they never outgrow the cache
            dec.lens[torch.tensor(free_in, device=dev)] = 0
        Lb = min(capacity, math.ceil((int(dec.lens[:Bb].max()) + k) / len_bucket) * len_bucket)
        dec.col.zero_()
        for _ in range(k):
            dec.run(Bb, Lb, hist_tok, hist_logp)
        ht, hl = hist_tok[:Bb].tolist(), hist_logp[:Bb].tolist()  # the one host sync per k steps
        for s in range(Bb):
            i = slot_row[s]
            if i >= 0 and take(i, ht[s], hl[s]):
                slot_row[s] = -1
    return out


def _generate_simple(hf, prompts, max_new, stop_set, pad_id, temperature, top_p, batch_size, seed, row_ids,
                     progress, check_every):
    """The model's own forward and KV cache (any architecture, e.g. hybrid Mamba caches), static batches
    of left-padded prompts, the same sampler; stops checked every `check_every` steps."""
    dev = next(hf.parameters()).device
    seed_t = torch.tensor([seed], dtype=torch.long, device=dev)
    out = []
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        limit = max_new[b:b + batch_size]
        B, L = len(batch), max(len(p) for p in batch)
        ids = torch.full((B, L), pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((B, L), dtype=torch.long, device=dev)
        for i, p in enumerate(batch):
            ids[i, L - len(p):] = torch.tensor(p, device=dev)
            mask[i, L - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L) position ids from the mask
        rows = torch.tensor(row_ids[b:b + batch_size], device=dev)
        stop = torch.tensor(sorted(stop_set) or [-1], device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        limit_t = torch.tensor(limit, device=dev)
        toks, logps, cache, cur = [], [], None, ids
        for t in range(max(limit)):
            o = hf(input_ids=cur, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
            cache = o.past_key_values
            nxt, lp = sample_next(o.logits[:, -1].float(), temperature, top_p, seed_t, rows, torch.full_like(rows, t))
            toks.append(nxt)
            logps.append(lp)
            done = done | torch.isin(nxt, stop) | (t + 1 >= limit_t)
            cur, pos = nxt[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if (t + 1) % check_every == 0 and bool(done.all()):
                break
        toks, logps = torch.stack(toks, 1).tolist(), torch.stack(logps, 1).tolist()  # (B, steps)
        for i in range(B):
            n_ = next((j + 1 for j, x in enumerate(toks[i][:limit[i]]) if x in stop_set), None)
            fin = n_ is not None
            n_ = n_ or min(len(toks[i]), limit[i])
            out.append({"completion_ids": toks[i][:n_], "logp": logps[i][:n_], "finished": fin,
                        "truncated": not fin and n_ >= limit[i]})
        if progress is not None:
            progress.update(B)
    return out


# ------------------------------------------------------------------------------------------------
# The same job through an OpenAI-compatible server (evaluate.py --api-url)

def generate_api(url, prompts, *, model, max_new_tokens, stop_ids, temperature=1.0, top_p=1.0, seed=0, row_ids=None,
                 key=None, workers=16, retries=5, timeout=3600, backoff=1.0, on_done=None, progress=None):
    """POST url/completions once per prompt, `workers` at a time. The prompt goes as token ids (the
    server applies no template of its own), the seed of prompt i as seed * 1_000_003 + row_ids[i] (a
    per-request seed), stop_ids as vLLM / SGLang's stop_token_ids with skip_special_tokens off. As each
    request ends, on_done(i, out) runs in this thread with out = {"text", "truncated", "num_tokens"}
    (num_tokens None when the server reports no usage), or {"error"} for a request that failed for
    good (common.http_post); when on_done returns True, the requests not started yet are cancelled
    (those in flight still end and reach on_done). Returns the outs in prompt order (None: cancelled)."""
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)

    def parse(d):  # a reply of another shape (text not UTF-8, a token count that is not one) is malformed
        ch = d["choices"][0]
        n = (d.get("usage") or {}).get("completion_tokens")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"usage.completion_tokens is {n!r}, not a token count")
        return common.reply_text(ch["text"]), ch.get("finish_reason"), n

    def one(i):
        body = {"model": model, "prompt": prompts[i], "n": 1, "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed * 1_000_003 + row_ids[i], "stop_token_ids": list(stop_ids),
                "skip_special_tokens": False}
        try:
            text, finish, n = common.http_post(url.rstrip("/") + "/completions", body, key, retries=retries,
                                               backoff=backoff, timeout=timeout, parse=parse)
        except common.RequestFailed as e:
            return i, {"error": str(e)}
        return i, {"text": text, "truncated": finish == "length", "num_tokens": n}

    outs = [None] * len(prompts)
    with ThreadPoolExecutor(workers) as ex:
        futures = [ex.submit(one, i) for i in range(len(prompts))]
        for fut in as_completed(futures):
            if fut.cancelled():
                continue
            i, outs[i] = fut.result()
            if progress is not None:
                progress.update(1)
            if on_done is not None and on_done(i, outs[i]):
                for f in futures:
                    f.cancel()  # the requests not started yet
    return outs
