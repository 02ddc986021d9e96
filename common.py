"""What a stage's numbers depend on, shared by two or more stages: a stage reader opens this file and the stage.

  1. compute: the device, torchrun / single-process init, seeding, dtype choice, all-reduce helpers, the store barrier
  2. models: loading, `Policy` and its (logp, entropy) head, padding and positions, the FSDP2 / HSDP wrap
  3. chat: prompt rendering with the tokenizer's own template, SFT targets that keep the reasoning, the
     13-gram sets of the decontamination (sft.py --decontaminate, benchmarks.train_overlap)
  4. text: the reasoning / answer split on the last </think>
  5. optimizer and schedule

Generation lives in engine.py (its sampler in sampler.py); every other shared module changes no number (the
file table: docs/design.md §1). The algorithms (losses, advantages, masking) stay in the stage that owns them.
"""
import datetime
import json
import math
import os
import random
import re
import time
from collections import namedtuple

import torch
import torch.distributed as dist
import torch.nn as nn

import preflight
from errors import UsageError, first_line


# ------------------------------------------------------------------------------------------------
# 1. compute

Dist = namedtuple("Dist", "rank local_rank world device")
DIST_TIMEOUT_MIN = 60.0


def resolve_device(device="auto"):
    """'auto' | 'cuda' | 'cpu' -> 'cuda' when torch sees a GPU and 'cpu' is not asked for, else 'cpu'; a device
    that cannot run stops first with its likely cause (preflight.check_device)."""
    preflight.check_device(device)
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def init_dist(device="auto", timeout_min=DIST_TIMEOUT_MIN):
    """-> Dist: under torchrun (RANK/LOCAL_RANK/WORLD_SIZE) the process group of docs/design.md §2, 'Compute',
    with a `timeout_min` collective timeout; otherwise one process, no group. The device: resolve_device."""
    preflight.check_dist_timeout(timeout_min)
    cuda = resolve_device(device) == "cuda"
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        preflight.check_local_rank(local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():  # CUDA: NCCL for GPU tensors, gloo for CPU ones (--cpu-offload's gradient norm)
        kw = {"device_id": dev} if cuda else {}
        backend = "cuda:nccl,cpu:gloo" if cuda else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min), **kw)
    return Dist(rank, local_rank, world, dev)


def is_dist():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_dist() else 0


def print0(*a, **kw):
    if rank() == 0:
        print(*a, **kw, flush=True)


_barriers = [0]


def barrier():
    """Every rank reaches this point before any goes on, waiting outside a collective, without a time limit
    (docs/design.md §2, 'Compute'): each rank adds 1 to a counter in the process group's store, then polls it
    (every <= 0.5 s) until it reads the world size. Ranks call barrier() in the same order (the key counts calls)."""
    if not is_dist():
        return
    store = dist.distributed_c10d._get_default_store()
    _barriers[0] += 1
    key, world, pause = f"beyond_sft/barrier/{_barriers[0]}", dist.get_world_size(), 0.001
    store.add(key, 1)
    while store.add(key, 0) < world:
        time.sleep(pause)
        pause = min(2 * pause, 0.5)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # every device's generator, each CUDA device's included


def pick_dtype(name, device):
    """'bf16' | 'fp32' | None (bf16 on CUDA, fp32 on CPU) -> the compute dtype."""
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in ("bf16", "fp32"):
        raise UsageError(f"--dtype must be bf16 or fp32, got {name!r}")
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def comm_device():
    """Where a tensor for a collective lives: this rank's GPU under NCCL, else the CPU (gloo, one process)."""
    if is_dist() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t, op="sum"):
    """In-place all-reduce across ranks (no-op in a single process). op: sum | max | min."""
    if is_dist():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op])
    return t


def gather_objects(items):
    """Every rank gets the concatenation of all ranks' lists, in rank order. Ranks meet at `barrier` first:
    they come here after uneven work (generation, grading), which must not wait inside the collective."""
    if not is_dist():
        return list(items)
    barrier()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for p in parts for x in p]


# ------------------------------------------------------------------------------------------------
# 2. models

def load_tokenizer(path, trust_remote_code=False, require_chat_template=True, what="tokenizer"):
    """The checkpoint's tokenizer, refused unless it gives text back unchanged (preflight.check_tokenizer: one
    that loses spaces would corrupt every target, rollout, reward input and grade); pad = eos when unset."""
    from transformers import AutoTokenizer
    p = preflight.check_path(path, what)
    preflight.check_tokenizer_files(p, what, path)
    try:
        tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a missing / broken file of the user's dir
        raise UsageError(f"{what} {path}: cannot load its tokenizer ({type(e).__name__}: {first_line(e)})") from None
    preflight.check_tokenizer(tok, what, path, require_chat_template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # pad may equal eos: masks are carried explicitly everywhere
    return tok


def load_model(path, dtype=torch.float32, device="cpu", trust_remote_code=False):
    """A causal LM from a hub id or local dir, safetensors only."""
    from transformers import AutoModelForCausalLM
    p = preflight.check_path(path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # a hub id check_model could not look into
        raise UsageError(f"cannot load model from {path}: {first_line(e)}") from None
    return model.to(device)


def stop_token_ids(tok, model_or_config, chat_kwargs=None):
    """Every id in generation_config.eos_token_id, the tokenizer's eos and the end-of-turn token."""
    ids = set()
    eos = getattr(getattr(model_or_config, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    eot = tok.encode(end_of_turn(tok, chat_kwargs).strip(), add_special_tokens=False)
    if len(eot) == 1:
        ids.add(eot[0])
    return sorted(ids)


def decoder_layers(model):
    """The transformer blocks, found generically: the largest ModuleList of identical modules."""
    best = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1:
            if best is None or sum(p.numel() for p in m.parameters()) > sum(p.numel() for p in best.parameters()):
                best = m
    if best is None:
        raise UsageError(f"cannot find the decoder layers of {type(model).__name__}")
    return list(best)


class Policy(nn.Module):
    """A causal LM whose forward returns per-token (logp, entropy) without materialising logits: the fused
    lm_head op runs inside the FSDP root's forward, where the (tied) embedding / lm_head weight is unsharded
    (docs/design.md §4). Generation reads `.hf` itself (engine.py)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask=None, position_ids=None, *, targets, temperature=1.0,
                chunk_tokens=4096):
        """(B, T) ids -> (logp, ent), each (B, T) float32: log p(targets[t]) and the entropy H_t of the
        next-token distribution at position t, softmax(z / temperature) over the full vocabulary, through
        head_logprobs (never labels=, which upcasts the full logits to float32; never a [B*T, V] tensor)."""
        out = self.hf.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        h = out.last_hidden_state  # (B, T, D)
        B, T, D = h.shape
        logp, ent = head_logprobs(self.hf, h.reshape(B * T, D), targets.reshape(B * T), temperature, chunk_tokens)
        # clone: an FSDP module returning a view warns that in-place ops on it would skip its backward hook
        return logp.view(B, T).clone(), ent.view(B, T).clone()


def head_logprobs(hf, hidden, targets, temperature=1.0, chunk_tokens=4096, argmax=False):
    """The one teacher-forced head (rl.py and sft.py through Policy, entropy.py's token_stats):
    final hidden states (N, D) -> logp, ent (N,) float32 of softmax(z / τ) for targets (N,), where
    τ = temperature · logits_scaling (Granite divides its logits by it), x = lm_head(hidden) and
    z = cap · tanh(x / cap) when the config soft-caps its logits (Gemma-2's final_logit_softcapping), else x.
    With argmax=True also the argmax token of each row (N,) (entropy.py's memorization). Differentiable: a plain
    head (no cap, bias or argmax) runs the fused lm_head kernel, no logits tensor; any other forms the logits
    one chunk of tokens at a time in the model dtype, which autograd keeps (docs/design.md §3, 'Kernel')."""
    from kernels import lm_head_logprobs_and_entropy, logprobs_and_entropy
    cfg, head = hf.config, hf.get_output_embeddings()
    tau = temperature * getattr(cfg, "logits_scaling", 1.0)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if not cap and head.bias is None and not argmax:
        return lm_head_logprobs_and_entropy(hidden, head.weight, targets, tau, chunk_tokens)
    logp, ent, am = [], [], []
    for a in range(0, len(targets), chunk_tokens):
        x = head(hidden[a:a + chunk_tokens])                               # (n, V) model dtype
        z = torch.tanh(x / cap) * cap if cap else x
        lp, e = logprobs_and_entropy(z, targets[a:a + chunk_tokens], tau)  # (n,), (n,) float32
        logp.append(lp), ent.append(e), am.append(z.argmax(-1))
    out = torch.cat(logp), torch.cat(ent)
    return (*out, torch.cat(am)) if argmax else out


def pad_right(seqs, value=0, length=None, dtype=None, device=None):
    """Sequences (lists of ids or 1-D tensors) -> (B, L) tensor padded with `value` on the right and the
    (B, L) bool mask of real entries; L = `length` or the longest. The one padding helper of every stage."""
    seqs = [s if torch.is_tensor(s) else torch.tensor(s, dtype=dtype or torch.long) for s in seqs]
    L = max(len(s) for s in seqs) if length is None else length
    out = torch.full((len(seqs), L), value, dtype=dtype or seqs[0].dtype, device=device or seqs[0].device)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool, device=out.device)
    for i, s in enumerate(seqs):
        out[i, :len(s)], mask[i, :len(s)] = s, True
    return out, mask


def positions_from_mask(mask):
    """(B, T) 0/1 attention mask -> (B, T) position ids (cumsum - 1, pads clamped to 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def hsdp_replicas(replicate, world):
    """--replicate: how many FSDP2 replicas (HSDP: shard inside a group of world/replicate ranks,
    replicate across groups). None -> one per node when torchrun spans several nodes (LOCAL_WORLD_SIZE <
    WORLD_SIZE), else 1 (flat FSDP2 over every rank)."""
    if replicate is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        replicate = world // local if 0 < local < world and world % local == 0 else 1
    if replicate < 1 or world % replicate:
        raise UsageError(f"--replicate {replicate} must be >= 1 and divide the world size {world}")
    return replicate


_MESHES = {}


def device_mesh(device, world, replicate):
    """FSDP2's mesh: 1-D over all ranks, or 2-D (replicate, shard) for HSDP. Rank r sits at
    (r // shard, r % shard): a shard group is world/replicate consecutive ranks, i.e. one node."""
    if replicate == 1:
        return None  # fully_shard's default: every rank in one shard group
    from torch.distributed.device_mesh import init_device_mesh
    key = (torch.device(device).type, replicate, world // replicate)
    if key not in _MESHES:  # the policy and the reference share one set of process groups
        _MESHES[key] = init_device_mesh(key[0], key[1:], mesh_dim_names=("replicate", "shard"))
    return _MESHES[key]


def fsdp_wrap(model, param_dtype=torch.bfloat16, cpu_offload=False, mesh=None):
    """FSDP2: shard each decoder layer, then the root (which holds the tied embedding / lm_head in one group);
    bf16 compute, fp32 master weights and fp32 gradient reduction. With a 2-D mesh (HSDP) each gradient is
    reduce-scattered in its shard group, then all-reduced across the replicas, both as means: the mean over ALL
    ranks, as with the flat mesh, so `loss * world / n_tok` stays the global token mean (tests/dist/hsdp_check.py)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kw = dict(mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else None, mesh=mesh)
    kw = {k: v for k, v in kw.items() if v is not None}
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def build_policy(path, dist_, param_dtype, grad_ckpt=False, cpu_offload=False, trust_remote_code=False,
                 master_dtype=torch.float32, replicate=1):
    """A model for training -> (Policy, export_dtype: the checkpoint's own dtype, used when saving). One process:
    a plain module (autocast in the stage); torchrun: meta-init, FSDP2 wrap (HSDP when replicate > 1), rank 0's
    weights broadcast shard by shard."""
    from transformers import AutoConfig, AutoModelForCausalLM
    p = preflight.check_path(path, "model")
    cfg = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    export_dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    if isinstance(export_dtype, str):
        export_dtype = getattr(torch, export_dtype)
    if dist_.world == 1:
        hf = load_model(path, master_dtype, dist_.device, trust_remote_code)
        if grad_ckpt:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return Policy(hf), export_dtype
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    full = load_model(path, master_dtype, "cpu", trust_remote_code) if dist_.rank == 0 else None
    barrier()  # ranks 1..N wait here, not inside the first collective, while rank 0 downloads and loads
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=master_dtype, trust_remote_code=trust_remote_code)
    if grad_ckpt:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(hf)
    fsdp_wrap(policy, param_dtype, cpu_offload, device_mesh(dist_.device, dist_.world, replicate))
    policy.to_empty(device="cpu" if cpu_offload else dist_.device)
    sd = {f"hf.{k}": v for k, v in full.state_dict().items()} if full is not None else {}
    set_model_state_dict(policy, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                              strict=False))
    # Non-persistent buffers (RoPE inv_freq) are not in the state dict: copy rank 0's and broadcast.
    full_bufs = dict(full.named_buffers()) if full is not None else {}
    for name, b in hf.named_buffers():
        if name in full_bufs:
            b.copy_(full_bufs[name])
        dist.broadcast(b.data, 0)
    hf.generation_config = broadcast_object(full.generation_config if full is not None else None)  # rank 0's
    return policy, export_dtype


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (itself outside torchrun)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


# ------------------------------------------------------------------------------------------------
# 3. chat rendering: the tokenizer's own template, no system prompt; `chat_kwargs` (--chat-template-kwargs)
# are its template variables (docs/design.md §2, 'Chat rendering': each family's template)

TEMPLATE_DATE = datetime.date(2025, 1, 1)  # every strftime_now() of a template reads this date
_STRFTIME_NOW = re.compile(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""")


def pinned_template(template):
    """The chat template with each strftime_now('FORMAT') call replaced by TEMPLATE_DATE in that format."""
    return _STRFTIME_NOW.sub(lambda m: json.dumps(TEMPLATE_DATE.strftime(m.group(2))), template)


def apply_template(tok, messages, chat_kwargs=None, **kw):
    """tok.apply_chat_template(messages, tokenize=False, **kw) with the template's clock pinned
    (TEMPLATE_DATE) and the stage's template variables (`chat_kwargs`): every rendering goes through here."""
    return tok.apply_chat_template(messages, chat_template=pinned_template(tok.get_chat_template()), tokenize=False,
                                   **kw, **(chat_kwargs or {}))


def render_prompt_text(tok, prompt, chat_kwargs=None):
    return apply_template(tok, [{"role": "user", "content": prompt}], chat_kwargs, add_generation_prompt=True)


def render_prompt(tok, prompt, chat_kwargs=None):
    """One user turn, add_generation_prompt=True -> token ids (the template writes any special tokens)."""
    return tok.encode(render_prompt_text(tok, prompt, chat_kwargs), add_special_tokens=False)


def think_state(prompt_text):
    """Where a rendered prompt leaves the assistant turn: "open" (it ends with <think>: R1-Distill), "closed"
    (it ends with </think>: Qwen3's enable_thinking=false) or "none" (no think tag at its end)."""
    t = prompt_text.rstrip()
    return "open" if t.endswith("<think>") else "closed" if t.endswith("</think>") else "none"


def prompt_thinking(prompt_text):
    """A generation record's `thinking` (docs/design.md §2, 'Thinking on or off'): True when the prompt leaves
    a think block open (the completion is reasoning, </think>, answer)."""
    return think_state(prompt_text) == "open"


def end_of_turn(tok, chat_kwargs=None):
    """The text the template writes right after an assistant message (e.g. '<|im_end|>\\n'); else eos."""
    probe = "\x00PROBE\x00"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    try:
        text = apply_template(tok, msgs, chat_kwargs)
        tail = text[text.rindex(probe) + len(probe):]
    except Exception:
        tail = ""
    return tail if tail.strip() else (tok.eos_token or "")


def render_sft(tok, prompt, response, max_len=None, chat_kwargs=None, reasoning_when_off="refuse"):
    """SFT target (docs/design.md §2, 'Chat rendering'): rendered prompt + response + end-of-turn, appended by
    hand -> (ids, loss_mask), the mask True on the response and end-of-turn tokens; longer than max_len keeps
    the LAST max_len. A prompt that opens the think block takes the response without its leading <think>.
    A prompt that closes it and a response with reasoning: reasoning_when_off "refuse" raises UsageError,
    "drop" keeps the response's answer (UsageError when it has none), "keep" the response as it is."""
    ptext = render_prompt_text(tok, prompt, chat_kwargs)
    state = think_state(ptext)
    if state == "open" and response.lstrip().startswith("<think>"):
        response = response.lstrip()[len("<think>"):].lstrip("\n")  # the template already opened it
    elif state == "closed" and opens_think(response) and reasoning_when_off != "keep":
        _, answer, closed = split_reasoning(response)
        if reasoning_when_off == "refuse":
            raise UsageError("the prompt already closes the think block (thinking off) and the response carries "
                             "reasoning: the target would hold two think blocks")
        if not closed or not answer:
            raise UsageError("the response never closes its think block: it has no answer to train on")
        response = answer
    p_ids = tok.encode(ptext, add_special_tokens=False)
    r_ids = tok.encode(response + end_of_turn(tok, chat_kwargs), add_special_tokens=False)
    ids, mask = p_ids + r_ids, [False] * len(p_ids) + [True] * len(r_ids)
    if max_len is not None:
        ids, mask = ids[-max_len:], mask[-max_len:]
    return ids, mask


def ngrams(text, n=13):
    w = text.lower().split()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)} if len(w) >= n else {" ".join(w)} if w else set()


# ------------------------------------------------------------------------------------------------
# 4. the reasoning / answer split (docs/design.md §2, 'Reasoning / answer split': the formats handled)

GRANITE_THOUGHT, GRANITE_RESPONSE = "Here is my thought process:", "Here is my response:"


def opens_think(text):
    """The text opens a think block itself: <think> (or Granite 3.2's thought marker) first."""
    return text.lstrip().startswith(("<think>", GRANITE_THOUGHT))


def reasoning_spans(text, thinking=True):
    """Character spans of the split: ((r0, r1), (a0, a1), think_closed); text[r0:r1] is the reasoning,
    text[a0:a1] the answer (empty when the thinking never closed); unstripped (entropy.py maps tokens to
    segments with them). `thinking` False (prompt_thinking) and a text that opens no think block: all answer."""
    if not thinking and not opens_think(text):
        return (0, 0), (0, len(text)), True
    lead = len(text) - len(text.lstrip())
    if text[lead:].startswith(GRANITE_THOUGHT):  # Granite 3.2
        r0 = lead + len(GRANITE_THOUGHT)
        cut = text.rfind(GRANITE_RESPONSE, r0)
        if cut < 0:
            return (r0, len(text)), (len(text), len(text)), False
        return (r0, cut), (cut + len(GRANITE_RESPONSE), len(text)), True
    r0 = lead + len("<think>") if text[lead:].startswith("<think>") else 0
    cut = text.rfind("</think>")
    if cut < r0:  # no closing tag (after the opening one): unfinished thinking
        return (r0, len(text)), (len(text), len(text)), False
    a0, a1 = cut + len("</think>"), len(text)
    body = text[a0:]
    if body.lstrip().startswith("<response>"):  # Granite 3.3 / 4.0
        a0 += len(body) - len(body.lstrip()) + len("<response>")
        end = text.rfind("</response>", a0)
        a1 = end if end >= 0 else a1
    return (r0, cut), (a0, a1), True


def split_reasoning(text, thinking=True):
    """Split on the LAST </think> (or Granite's markers): (reasoning minus a leading <think>, answer,
    think_closed), both stripped; thinking=False and a text that opens no think block: all answer, closed."""
    (r0, r1), (a0, a1), closed = reasoning_spans(text, thinking)
    return text[r0:r1].strip(), text[a0:a1].strip(), closed


# ------------------------------------------------------------------------------------------------
# 5. optimizer and schedule

def clip_grad_norm(model, max_norm):
    """Clip after the gradients are reduced; returns the global norm as a plain tensor (DTensor under FSDP2)."""
    g = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def cosine_lr(step, total, warmup):
    """Multiplier for LambdaLR: linear warmup over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def build_optimizer(params, args, total):
    """--optim at peak --lr with --betas and --weight-decay: torch's AdamW, or bitsandbytes' 8-bit AdamW (adamw8bit,
    CUDA only: cli.check_training ran preflight.check_optimizer before any model loaded), and its schedule over `total`
    steps: linear warmup over max(1, round(--warmup-ratio · total)) steps, then cosine to 0 -> (optimizer, LambdaLR)."""
    kw = dict(lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    if args.optim == "adamw8bit":
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(params, **kw)
    else:
        opt = torch.optim.AdamW(params, **kw)
    warmup = max(1, round(args.warmup_ratio * total))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, warmup))
