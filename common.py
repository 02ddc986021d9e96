"""Plumbing shared by two or more stages (sft.py, rl.py, evaluate.py, entropy.py, reward.py).

What lives here, in the order the stages use it:
  1. compute: torchrun / single-process init, seeding, dtype choice, all-reduce helpers
  2. models: tokenizer and model loading, the FSDP2 wrap (~40 lines), the `Policy` wrapper whose
     forward returns per-token (logp, entropy) through the fused lm_head kernel
  3. chat: prompt rendering with the tokenizer's own template, SFT targets that keep the reasoning
  4. data: hub id or local .jsonl/.json/.csv/.parquet, schema detection, errors naming file/row/field
  5. text: the reasoning / answer split on the last </think>
  6. checkpoints: Hugging Face export + resumable sharded state, both written atomically
  7. logging: one fixed-format line per step, metrics.jsonl, args.json, optional wandb
  8. HTTP: one JSON POST with retries (an OpenAI-compatible server for generation and the judge)

Generation lives in engine.py. The algorithms (losses, advantages, masking) stay in the stage that owns them.
"""
import argparse
import csv
import datetime
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections import namedtuple
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn


class UsageError(ValueError):
    """A problem with what the user passed (path, flag value): printed without a traceback."""


class DataError(UsageError):
    """A bad data file or row; the message names the file, the 1-based row and the field."""


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient norm or weight: the run stops before anything non-finite is written."""


def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def cli_main(main):
    """Run a stage's main() as a CLI with the exit codes every CLI shares: 0 done; 2 a usage or data
    error (bad flag, path, row: `error: ...` on stderr, no traceback); 1 a run that stopped on a
    non-finite value. Under torchrun it ends with finish()."""
    try:
        main()
        finish()
    except UsageError as e:  # DataError included: the message names file, row and field
        release_out_dirs()
        die(str(e), 2)
    except NonFiniteError as e:
        release_out_dirs()
        die(str(e), 1)


# --- flag validation: every CLI checks its flags with these before any model or data loads -----------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every stage's --help: "(default: X)" after each flag that has a value, unless its help says
    "(default ..." or "by default" itself."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default in (None, False) or "(default" in h or "by default" in h:
            return action.help
        return super()._get_help_string(action)


def _flag_value(args, flag):
    return getattr(args, flag.lstrip("-").replace("-", "_"))


def check_min(args, *flags, lo=1):
    """Integer flags that must be >= lo (None = unset, skipped)."""
    for f in flags:
        v = _flag_value(args, f)
        if v is not None and v < lo:
            raise UsageError(f"{f} must be >= {lo}, got {v}")


def check_range(args, flag, lo=None, hi=None, lo_open=False, hi_open=False):
    """A float flag inside [lo, hi] (either end open or absent); NaN and inf are refused."""
    v = _flag_value(args, flag)
    if v is None:
        return
    ok = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
        (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        lb = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        ub = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        want = f"in {lb}, {ub}" if lo is not None and hi is not None else (f"> {lo:g}" if lo_open else f">= {lo:g}") \
            if lo is not None else (f"< {hi:g}" if hi_open else f"<= {hi:g}")
        raise UsageError(f"{flag} must be {want} (and finite), got {v}")


def check_training(args):
    """The optimizer and run flags sft.py and rl.py share."""
    check_range(args, "--lr", 0, lo_open=True)
    check_range(args, "--warmup-ratio", 0, 1)
    check_range(args, "--weight-decay", 0)
    check_range(args, "--clip", 0, lo_open=True)
    for i, b in enumerate(args.betas):
        if not 0 <= b < 1:
            raise UsageError(f"--betas: beta{i + 1} must be in [0, 1), got {b}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")


def check_sampling(args, greedy_ok=False):
    """--temperature > 0 (or 0 = greedy where the stage supports it) and 0 < --top-p <= 1."""
    t = args.temperature
    if not math.isfinite(t) or t < 0 or (t == 0 and not greedy_ok):
        raise UsageError(f"--temperature must be {'>= 0 (0: greedy)' if greedy_ok else '> 0'}, got {t}")
    check_range(args, "--top-p", 0, 1, lo_open=True)


def import_optional(module, flag, pip_name=None):
    """Import an optional package a flag needs at start (before any model loads), with a one-line hint."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{flag} needs the {module} package: pip install {pip_name or module}") from None


def check_out_file(path, flag="--out"):
    """An output FILE can be written: its directory exists and is writable, and it is not a directory."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a directory; give a file path")
    if not os.path.isdir(d):
        raise UsageError(f"{flag}: directory {d} does not exist")
    if not os.access(d, os.W_OK):
        raise UsageError(f"{flag}: directory {d} is not writable")


# ------------------------------------------------------------------------------------------------
# 1. compute

Dist = namedtuple("Dist", "rank local_rank world device")


def init_dist():
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE: NCCL on CUDA, gloo on CPU. Otherwise one process, no group."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, local_rank, world, torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def is_dist():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_dist() else 0


def finish():
    """End a torchrun process cleanly: a barrier, then tear the process group down (a gloo group left
    to the interpreter's exit can abort the process). Also releases the output-dir lock."""
    release_out_dirs()
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def print0(*a, **kw):
    if rank() == 0:
        print(*a, **kw, flush=True)


def barrier():
    if is_dist():
        dist.barrier()


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick_dtype(name, device):
    """'bf16' | 'fp32' | None (bf16 on CUDA, fp32 on CPU) -> the compute dtype."""
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in ("bf16", "fp32"):
        raise UsageError(f"--dtype must be bf16 or fp32, got {name!r}")
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def all_reduce(t, op="sum"):
    """In-place all-reduce across ranks (no-op in a single process). op: sum | max | min."""
    if is_dist():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op])
    return t


def gather_objects(items):
    """Every rank gets the concatenation of all ranks' lists, in rank order."""
    if not is_dist():
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for p in parts for x in p]


# ------------------------------------------------------------------------------------------------
# 2. models

def _check_path(path, what):
    """A path that looks local (starts with ./, /, ~, or has two slashes) must exist; a hub id passes."""
    p = os.path.expanduser(str(path))
    looks_local = p.startswith((".", "/", "~")) or p.count("/") > 1  # a hub id is "org/name"
    if looks_local and not os.path.exists(p):
        raise UsageError(f"{what} path does not exist: {path}")
    return p


ROUND_TRIP = "a b c"  # what every tokenizer must give back unchanged: decode(encode(ROUND_TRIP))


def load_tokenizer(path, trust_remote_code=False, require_chat_template=True):
    """The checkpoint's tokenizer, refused unless decode(encode("a b c")) == "a b c": a tokenizer that loses
    spaces would silently corrupt every target, rollout, reward input and grade. The known cause is a
    transformers version that loads the checkpoint as another tokenizer: transformers 5.17 loads
    DeepSeek-R1-Distill-Llama (tokenizer_class LlamaTokenizerFast over a ByteLevel tokenizer.json) as a
    Metaspace tokenizer, and "Is it worth me being alive?" comes back "Isitworthmebeingalive?"."""
    import transformers
    from transformers import AutoTokenizer
    p = _check_path(path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UsageError(f"cannot load tokenizer from {path}: {e}") from None
    back = tok.decode(tok.encode(ROUND_TRIP, add_special_tokens=False), skip_special_tokens=True)
    if back != ROUND_TRIP:
        raise UsageError(f"tokenizer at {path} ({type(tok).__name__}) loses text: decode(encode({ROUND_TRIP!r})) = "
                         f"{back!r}, which would corrupt every target, rollout, reward input and grade. The known "
                         f"cause is the transformers version (installed: {transformers.__version__}): 5.17 loads "
                         f"DeepSeek-R1-Distill-Llama's tokenizer (tokenizer_class LlamaTokenizerFast over a ByteLevel "
                         f"tokenizer.json) as a Metaspace one and drops every space; install the versions "
                         f"requirements.txt pins")
    if require_chat_template and not tok.chat_template:
        raise UsageError(f"tokenizer at {path} has no chat template (tokenizer_config.json chat_template)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # pad may equal eos: masks are carried explicitly everywhere
    return tok


def load_model(path, dtype=torch.float32, device="cpu", trust_remote_code=False):
    """A causal LM from a hub id or local dir, safetensors only."""
    from transformers import AutoModelForCausalLM
    p = _check_path(path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UsageError(f"cannot load model from {path}: {e}") from None
    return model.to(device)


def stop_token_ids(tok, model_or_config, chat_kwargs=None):
    """Every id in generation_config.eos_token_id, the tokenizer's eos and the end-of-turn token."""
    ids = set()
    gc = getattr(model_or_config, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
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
    """A causal LM whose forward can return per-token (logp, entropy) without materialising logits.

    Wrapping the Hugging Face model in one module makes the fused lm_head op run inside the FSDP root's
    forward, where the (tied) embedding / lm_head weight is unsharded (docs/design.md §4). Without `targets`
    the forward is the plain Hugging Face one (used by the sampler).
    """

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask=None, position_ids=None, targets=None, temperature=1.0,
                chunk_tokens=4096, **kw):
        if targets is None:
            return self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
        return forward_logprobs(self.hf, input_ids, attention_mask, position_ids, targets, temperature, chunk_tokens)


def forward_logprobs(hf, input_ids, attention_mask, position_ids, targets, temperature=1.0, chunk_tokens=4096):
    """(B, T) ids -> (logp, ent), each (B, T) float32: log p(targets[t]) and the entropy H_t of the
    next-token distribution at position t, softmax(z / temperature) over the full vocabulary.

    Never passes labels= (that upcasts the full logits to float32) and never forms a [B*T, V] tensor:
    the final hidden states go through head_logprobs, one chunk of tokens at a time.
    """
    out = hf.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    h = out.last_hidden_state  # (B, T, D)
    B, T, D = h.shape
    logp, ent = head_logprobs(hf, h.reshape(B * T, D), targets.reshape(B * T), temperature, chunk_tokens)
    # clone: an FSDP module returning a view warns that in-place ops on it would skip its backward hook
    return logp.view(B, T).clone(), ent.view(B, T).clone()


def head_logprobs(hf, hidden, targets, temperature=1.0, chunk_tokens=4096, argmax=False):
    """The one teacher-forced head (rl.py and sft.py through forward_logprobs, entropy.py's token_stats):
    final hidden states (N, D) -> logp, ent (N,) float32 of softmax(z / τ) for targets (N,), where
    τ = temperature · logits_scaling (Granite divides its logits by it), x = lm_head(hidden) and
    z = cap · tanh(x / cap) when the config soft-caps its logits (Gemma-2's final_logit_softcapping), else x.
    With argmax=True also the argmax token of each row (N,) (entropy.py's memorization).

    Plain head (no soft cap, no bias, no argmax): the fused lm_head kernel, no logits tensor at all.
    Otherwise the logits exist one chunk of tokens at a time, in the model dtype, then
    kernels.logprobs_and_entropy; differentiable as well, but autograd keeps each chunk's logits.
    """
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


# Model types whose transformers forward keeps packed samples apart when position ids restart at 0 per
# sample and no attention mask is passed (it builds a block-diagonal causal mask from the restarts):
# checked packed == unpacked by tests/test_families.py. Not GraniteMoeHybrid: its attention mask ignores
# position ids (and Granite-4.0 has no RoPE), and its Mamba-2 layers carry their state into the next
# sample; transformers' packed-sequence argument (seq_idx) reaches only the CUDA kernels, the PyTorch
# conv / scan fallback ignores it. Any model type not listed here trains unpacked (sft.py says so).
PACKING_EXACT = ("llama", "qwen2", "qwen3")


def packing_exact(config):
    return getattr(config, "model_type", None) in PACKING_EXACT


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


def device_mesh(device, world, replicate):
    """FSDP2's mesh: 1-D over all ranks, or 2-D (replicate, shard) for HSDP. Rank r sits at
    (r // shard, r % shard): a shard group is world/replicate consecutive ranks, i.e. one node."""
    if replicate == 1:
        return None  # fully_shard's default: every rank in one shard group
    return _mesh(torch.device(device).type, replicate, world // replicate)


_MESHES = {}


def _mesh(device_type, replicate, shard):
    from torch.distributed.device_mesh import init_device_mesh
    key = (device_type, replicate, shard)
    if key not in _MESHES:  # the policy and the reference share one set of process groups
        _MESHES[key] = init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("replicate", "shard"))
    return _MESHES[key]


def fsdp_wrap(model, device, param_dtype=torch.bfloat16, cpu_offload=False, mesh=None):
    """FSDP2: shard each decoder layer, then the root (which holds the tied embedding / lm_head in one
    group). bf16 compute, fp32 master weights and fp32 gradient reduction.

    With a 2-D mesh (HSDP) each gradient is reduce-scattered inside its shard group, then all-reduced
    across the replicas, both as means: the result is the mean over ALL ranks, exactly as with the flat
    mesh, so the stages' `loss * world / n_tok` stays the global token mean (tests/dist_hsdp_check.py)."""
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
    """Load a model for training: one process -> plain module (autocast in the stage); torchrun ->
    meta-init on every rank, FSDP2 wrap (HSDP when replicate > 1), rank 0's weights broadcast shard by shard.

    Returns (policy, export_dtype): export_dtype is the checkpoint's own dtype, used when saving.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    p = _check_path(path, "model")
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
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=master_dtype, trust_remote_code=trust_remote_code)
    if full is not None:
        hf.generation_config = full.generation_config
    if grad_ckpt:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(hf)
    fsdp_wrap(policy, dist_.device, param_dtype, cpu_offload, device_mesh(dist_.device, dist_.world, replicate))
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
    hf.generation_config = _broadcast_obj(hf.generation_config)
    return policy, export_dtype


def _broadcast_obj(obj):
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


# ------------------------------------------------------------------------------------------------
# 3. chat rendering (docs/design.md §2: the tokenizer's own template, no system prompt)
#
# `chat_kwargs` (the stages' --chat-template-kwargs) are passed to apply_chat_template as template
# variables: Qwen3's {"enable_thinking": false}, Granite's {"thinking": true}. The three families:
#   R1-Distill (Qwen2 / Llama): past assistant turns lose everything up to </think>; the generation
#       prompt ends with "<think>\n", so the model writes only the closing tag
#   Qwen3: enable_thinking (default true); false ends the generation prompt with an empty
#       "<think>\n\n</think>\n\n" block
#   Granite (3.2 / 3.3 / 4.0-tiny-preview): thinking (default false) adds a system turn asking for
#       reasoning first; the split below handles the formats those model cards document; its default
#       system turn writes today's date (pinned: TEMPLATE_DATE)
# Where the prompt leaves the think block (think_state) becomes each record's `thinking`, which tells
# the split (section 5) whether a completion starts inside the reasoning.

# apply_chat_template's own arguments: a template variable of the same name would be swallowed by them
_RESERVED_CHAT_KWARGS = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                         "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                         "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


def chat_template_kwargs(text):
    """argparse type of --chat-template-kwargs: a JSON object -> dict (argparse names the flag on error)."""
    import argparse
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at char {e.pos}): {text!r}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"want a JSON object such as '{{\"enable_thinking\": false}}', got {text!r}")
    bad = sorted(_RESERVED_CHAT_KWARGS & obj.keys())
    if bad:
        raise argparse.ArgumentTypeError(f"{bad} are apply_chat_template arguments, not template variables")
    return obj


# A template that reads the clock (Granite's default system turn writes "Today's Date: " + strftime_now(...))
# would make every SFT target, rollout and evaluation prompt depend on the day it is rendered: each
# strftime_now('FORMAT') call is replaced by this fixed date, so a rendered prompt is a pure function of the
# row and the flags.
TEMPLATE_DATE = datetime.date(2025, 1, 1)
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
    """Where a rendered prompt leaves the assistant turn: "open" (it ends with <think>: the completion starts
    inside the reasoning; R1-Distill), "closed" (it ends with </think>: thinking switched off; Qwen3's
    enable_thinking=false) or "none" (no think tag at its end: Qwen3 and Granite with thinking on or off, R1's
    first template, plain instruct models)."""
    t = prompt_text.rstrip()
    return "open" if t.endswith("<think>") else "closed" if t.endswith("</think>") else "none"


def prompt_thinking(prompt_text):
    """The `thinking` of a generation record, a fact of the prompt it was sampled from (docs/design.md §2):
    True when the prompt leaves a think block open, so the completion is reasoning, </think>, answer; False
    when it does not, so the completion is the answer unless it opens a think block itself."""
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
    """SFT target: rendered prompt + the response text + end-of-turn, appended by hand, so templates that
    strip past reasoning (R1-Distill) cannot drop it. Returns (ids, loss_mask) with the mask True on the
    response and end-of-turn tokens. Longer than max_len: the LAST max_len tokens are kept (left truncation,
    as the STAR-1 recipe), so the end of the reasoning, the answer and the end-of-turn stay in the target;
    the prompt's head goes first.

    A prompt that opens the think block takes the response without its own leading <think>. A prompt that
    CLOSES it (thinking off) and a response that carries reasoning would make a target with two think
    blocks: reasoning_when_off "refuse" raises UsageError (sft.py), "drop" keeps the response's answer
    alone (sft.py --answer-only), "keep" keeps the response as it is (the reward model's input)."""
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


# ------------------------------------------------------------------------------------------------
# 4. data (docs/design.md §2)

# Known schemas, by columns: (prompt column candidates, response/gold column candidates)
PROMPT_FIELDS = ["question", "problem", "prompt", "input", "Question", "instruction"]
RESPONSE_FIELDS = ["response", "completion", "output", "answer"]


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {i}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_generations(path, need=("completion",)):
    """Generation records (docs/design.md §2) from a JSONL file, refused unless the file exists, holds a
    record, and every row has the fields `need` (names, or a function row -> names) as strings; `thinking`
    and `prompt_ids`, where present, must be true / false and a non-empty list of token ids."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    recs = read_jsonl(path)
    if not recs:
        raise DataError(f"{path}: no records")
    for i, r in enumerate(recs, 1):
        for f in need(r) if callable(need) else need:
            if not isinstance(r.get(f), str):
                raise DataError(f"{path}: row {i}: field '{f}' is missing or not a string")
        if not isinstance(r.get("thinking", True), bool):
            raise DataError(f"{path}: row {i}: field 'thinking' is not true or false")
        ids = r.get("prompt_ids")
        if ids is not None and not (isinstance(ids, list) and ids and
                                    all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ids)):
            raise DataError(f"{path}: row {i}: field 'prompt_ids' is not a non-empty list of token ids")
    return recs


def read_table(spec, split="train"):
    """Rows (list of dicts) from a local .jsonl/.json/.csv/.parquet file or a hub dataset id
    (`id`, `id:split`, `id:config:split`)."""
    spec = str(spec)
    ext = os.path.splitext(spec)[1].lower()
    if ext in (".jsonl", ".json", ".csv", ".parquet") or os.path.exists(spec):
        if not os.path.isfile(spec):
            raise DataError(f"{spec}: file not found")
        if ext == ".jsonl":
            return read_jsonl(spec)
        if ext == ".json":
            try:
                data = json.load(open(spec, encoding="utf-8"))
            except json.JSONDecodeError as e:
                if e.msg == "Extra data":  # really JSON lines
                    return read_jsonl(spec)
                raise DataError(f"{spec}: invalid JSON at line {e.lineno} ({e.msg})") from None
            data = data.get("data", data) if isinstance(data, dict) else data
            if not isinstance(data, list):
                raise DataError(f"{spec}: expected a list of objects")
            for i, r in enumerate(data, 1):
                if not isinstance(r, dict):
                    raise DataError(f"{spec}: row {i}: expected an object, got {type(r).__name__}")
            return data
        if ext == ".csv":
            with open(spec, newline="", encoding="utf-8") as f:
                return [dict(r) for r in csv.DictReader(f)]
        if ext == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(spec).to_pylist()
        raise DataError(f"{spec}: unknown file type (want .jsonl, .json, .csv or .parquet)")
    import datasets  # a hub id
    parts = spec.split(":")
    name, config, sp = parts[0], (parts[1] if len(parts) == 3 else None), (parts[-1] if len(parts) > 1 else split)
    try:
        return list(datasets.load_dataset(name, config, split=sp))
    except Exception as e:  # noqa: BLE001 -- many failure types (network, missing config, ...)
        raise DataError(f"{spec}: cannot load dataset ({type(e).__name__}: {e})") from None


def _pick(row, candidates):
    return next((c for c in candidates if c in row), None)


def load_pairs(spec, prompt_field=None, response_field=None, need_response=True, split="train"):
    """(prompt, response) rows for SFT / RL prompts, validated before any training starts.
    Returns dicts with prompt, [response], id, row (1-based). Errors name file, row and field."""
    rows = read_table(spec, split)
    if not rows:
        raise DataError(f"{spec}: no rows")
    pf = prompt_field or _pick(rows[0], PROMPT_FIELDS)
    rf = response_field or (_pick(rows[0], RESPONSE_FIELDS) if need_response else None)
    if pf is None:
        raise DataError(f"{spec}: row 1: no prompt field (looked for {PROMPT_FIELDS}; use --prompt-field)")
    if need_response and rf is None:
        raise DataError(f"{spec}: row 1: no response field (looked for {RESPONSE_FIELDS}; use --response-field)")
    out = []
    for i, r in enumerate(rows, 1):
        item = {"row": i, "id": str(r.get("id", r.get("unique_id", i)))}
        for key, field in (("prompt", pf), ("response", rf)):
            if field is None:
                continue
            v = r.get(field)
            if v is None:
                raise DataError(f"{spec}: row {i}: missing field '{field}'")
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{spec}: row {i}: field '{field}' is empty or not a string")
            item[key] = v
        out.append(item)
    return out


def ngrams(text, n=13):
    w = text.lower().split()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)} if len(w) >= n else {" ".join(w)} if w else set()


# ------------------------------------------------------------------------------------------------
# 5. the reasoning / answer split (docs/design.md §2)

# The formats handled (Granite's from its model cards; no hub access here to re-check them):
#   "<think>reasoning</think>answer"                   R1-Distill, Qwen3, Granite 3.3 / 4.0 with thinking
#   "<think>reasoning</think><response>answer</response>"   Granite 3.3 / 4.0-tiny-preview: the tags around
#                                                      the answer are dropped from it
#   "Here is my thought process: ... Here is my response: answer"   Granite 3.2 with thinking=True; only
#                                                      when the text OPENS with the first marker, so an R1
#                                                      trace that happens to say "Here is my response:"
#                                                      while still thinking is not cut there
GRANITE_THOUGHT, GRANITE_RESPONSE = "Here is my thought process:", "Here is my response:"


def opens_think(text):
    """The text opens a think block itself: <think> (or Granite 3.2's thought marker) first."""
    return text.lstrip().startswith(("<think>", GRANITE_THOUGHT))


def reasoning_spans(text, thinking=True):
    """Character spans of the split: ((r0, r1), (a0, a1), think_closed); text[r0:r1] is the reasoning,
    text[a0:a1] the answer (empty when the thinking never closed). Unstripped: entropy.py maps tokens
    to segments with these offsets. `thinking` is the record's (prompt_thinking): False and a text that
    opens no think block is an answer-only completion: all answer, think_closed True."""
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
    """Split on the LAST </think> (or Granite's markers, above): (reasoning minus a leading <think>,
    answer, think_closed), both stripped. thinking=False (the prompt left no think block open): a text
    that opens none is all answer (reasoning "", think_closed True). Records without a `thinking` field
    (older ones) are split with thinking=True, as they always were."""
    (r0, r1), (a0, a1), closed = reasoning_spans(text, thinking)
    return text[r0:r1].strip(), text[a0:a1].strip(), closed


# ------------------------------------------------------------------------------------------------
# 6. checkpoints: Hugging Face export + resumable sharded state, both atomic

def hf_of(model):
    return model.hf if isinstance(model, Policy) else model


def _full_state_dict(model):
    """The full (unsharded) state dict on rank 0's CPU. Collective under torchrun."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    hf = hf_of(model)
    if is_dist():
        return get_model_state_dict(hf, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in hf.state_dict().items()}


def _link_or_copy(src, dst):
    """Hard link (files are only ever replaced, never edited in place, so links are safe); copy if the
    filesystem refuses."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


HF_WEIGHT_PREFIXES = ("model.safetensors", "model-0", "pytorch_model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def save_tokenizer(tok, out):
    """The export's tokenizer: the files of the checkpoint it was loaded from (`tok.name_or_path`, a dir or a
    hub id in the local cache), copied byte for byte, so whatever loaded the input checkpoint (vLLM,
    another transformers version) loads the export the same way; tok.save_pretrained would rewrite them
    (tokenizer_class, added tokens, the template moved to its own file). A tokenizer with no files on
    disk is saved by save_pretrained."""
    from huggingface_hub import try_to_load_from_cache
    src, found = str(tok.name_or_path), []
    for name in TOKENIZER_FILES:
        try:
            path = os.path.join(src, name) if os.path.isdir(src) else try_to_load_from_cache(src, name)
        except ValueError:  # not a hub id either (a tokenizer built in memory)
            path = None
        if isinstance(path, str) and os.path.isfile(path):
            found.append((name, path))
    if not any(name == "tokenizer_config.json" for name, _ in found):
        tok.save_pretrained(out)
        return
    for name, path in found:
        shutil.copyfile(path, os.path.join(out, name))


def install_export(out):
    """Roll a complete export in OUT/.export.ready into OUT, replacing the previous one as a whole.

    .export.ready appears by one rename only once the export in it is complete; installing moves its
    files into OUT and removes weight and tokenizer files of the previous export that the new one lacks
    (a changed shard count; a chat_template.jinja that would override the copied tokenizer_config's).
    A run killed during the moves is finished by the next start on OUT (claim_out_dir), so OUT never
    keeps weights of two different steps."""
    ready = Path(out) / ".export.ready"
    if not ready.is_dir():
        return
    names = {f.name for f in ready.iterdir()}
    for f in Path(out).iterdir():
        stale = f.name.startswith(HF_WEIGHT_PREFIXES) or f.name in TOKENIZER_FILES
        if f.is_file() and stale and f.name not in names:
            f.unlink()
    for name in sorted(names, key=lambda n: n.endswith(".json")):  # weights first, config/index last
        os.replace(ready / name, Path(out) / name)
    ready.rmdir()


def save_hf(model, tok, out, export_dtype=None, step=None, checkpoint=False, keep=3):
    """Gather the full state dict to rank 0 and write a from_pretrained-loadable dir into `out`
    (config, safetensors, the input's tokenizer files (save_tokenizer), generation_config), swapped in as a
    whole (install_export).
    With `checkpoint`, the same files also become OUT/checkpoints/step-N/ (N = `step`; hard links, no
    optimizer state), keeping the newest `keep` (0 keeps all). Refuses non-finite weights before anything is written.
    Collective: every rank must call it."""
    check_finite_weights(model, step)
    hf = hf_of(model)
    sd = _full_state_dict(model)
    if rank() == 0:
        out = Path(out)
        install_export(out)  # a previous install cut short
        tmp = out / ".export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if export_dtype is not None:
            sd = {k: v.to(export_dtype) if v.is_floating_point() else v for k, v in sd.items()}
            hf.config.dtype = export_dtype
        hf.save_pretrained(tmp, state_dict=sd)
        save_tokenizer(tok, tmp)
        if checkpoint:
            ck = out / "checkpoints"
            ck.mkdir(exist_ok=True)
            shutil.rmtree(ck / f".step-{step}.tmp", ignore_errors=True)
            shutil.copytree(tmp, ck / f".step-{step}.tmp", copy_function=_link_or_copy)
            shutil.rmtree(ck / f"step-{step}", ignore_errors=True)
            os.replace(ck / f".step-{step}.tmp", ck / f"step-{step}")
            done = sorted((int(d.name[5:]) for d in ck.glob("step-*") if d.name[5:].isdigit()), reverse=True)
            for old_step in done[keep:] if keep else []:
                shutil.rmtree(ck / f"step-{old_step}", ignore_errors=True)
        os.replace(tmp, out / ".export.ready")  # the commit point: a complete export exists
        install_export(out)
    barrier()


# --- output-dir ownership: a lock for the run's life; a new run refuses a dir holding another run ----

_HELD = {}  # realpath of OUT -> open lock file (this process holds its flock)
RUN_FILES = ("state", "state.old", "state.tmp", "metrics.jsonl", "checkpoints", "rollouts")


def claim_out_dir(out, resume=False, overwrite=False):
    """Make this run the owner of OUT: an exclusive fcntl.flock on OUT/.lock held until the process
    ends (rank 0 holds it under torchrun). Without --resume a dir holding a previous run's state or
    metrics is refused unless --overwrite, which deletes those (state*, metrics.jsonl, checkpoints/,
    rollouts/) first. Also finishes an export install a killed run left half done. Collective."""
    import fcntl
    msg = None
    if rank() == 0:
        key = os.path.realpath(out)
        try:
            os.makedirs(out, exist_ok=True)
            if key not in _HELD:
                f = open(os.path.join(out, ".lock"), "a+")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.seek(0)
                    holder = f.read().strip() or "?"
                    f.close()
                    raise UsageError(f"--out {out} is in use by another run (pid {holder}); wait for it to finish "
                                     f"or pick another --out")
                f.seek(0), f.truncate(), f.write(f"{os.getpid()}\n"), f.flush()
                _HELD[key] = f
            install_export(out)
            found = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
            if not resume and found:
                if not overwrite:
                    raise UsageError(f"--out {out} holds a previous run ({', '.join(found)}): pass --resume to "
                                     f"continue it or --overwrite to replace it")
                for n in found:
                    p = os.path.join(out, n)
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        except UsageError as e:
            msg = str(e)
        except OSError as e:
            msg = f"--out {out}: {e}"
    if is_dist():
        msg = _broadcast_obj(msg)
    if msg:
        if rank() == 0:
            release_out_dirs(out)
        raise UsageError(msg)


def release_out_dirs(out=None):
    """Drop this process's lock on OUT (all of them when out is None); the lock file stays."""
    for key in [k for k in _HELD if out is None or k == os.path.realpath(out)]:
        _HELD.pop(key).close()


# --- the non-finite guard: nothing non-finite is ever stepped into or written ------------------------

def check_finite(step, device, **values):
    """Before opt.step(): every value (loss, grad_norm, ...; floats or tensors) checked on every rank,
    ONE all-reduced flag vector (every rank takes the same branch, no collective is left hanging).
    Raises NonFiniteError naming the step and what was non-finite: no step taken, nothing written."""
    bad = torch.tensor([0.0 if math.isfinite(float(v)) else 1.0 for v in values.values()], device=device)
    all_reduce(bad, "max")
    if bad.any():
        what = ", ".join(k for k, b in zip(values, bad.tolist()) if b)
        raise NonFiniteError(f"step {step}: non-finite {what} (on at least one rank); stopped before the "
                             f"optimizer step, nothing written: the last saved state and export are intact "
                             f"(lower --lr, or check the data of this step)")


def check_finite_weights(model, step):
    """The weights after an update are finite on every rank (a huge lr overflows them without a NaN
    gradient): save_hf calls it before anything is written, and the stages export before they save the state."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    bad = torch.tensor(float(any(not torch.isfinite(p.detach()).all() for p in local)), device=device)
    all_reduce(bad, "max")
    if bad.item():
        raise NonFiniteError(f"step {step}: the weights after the update are non-finite (is --lr too high?); "
                             f"nothing written: the last saved state and export are intact")


# --- resumable state ----------------------------------------------------------------------------------

STATE_DIRS = ("state", "state.old", "state.tmp")
COMPLETE = "COMPLETE"  # the completeness marker, written last in each state dir


def _pause_for_tests(step):
    """Test-only fault injection (tests/test_faults.py): BEYOND_SFT_PAUSE_IN_SAVE=STEP stops save_state at
    that step between its two renames (state.old and state.tmp complete, no state/) until killed."""
    if os.environ.get("BEYOND_SFT_PAUSE_IN_SAVE") == str(step):
        print(f"paused in save_state at step {step}", file=sys.stderr, flush=True)
        time.sleep(3600)


def save_state(out, model, optim, sched, step):
    """Sharded model + optimizer (torch.distributed.checkpoint) and per-rank extra state (step, which
    fixes the data position; scheduler; RNG) into out/state, atomically: write state.tmp, the COMPLETE
    marker last, then rename (state -> state.old, state.tmp -> state, drop state.old). A kill at any
    point leaves at least one complete state dir; load_state picks the newest. The stages call it after
    save_hf, which has already refused non-finite weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    out = Path(out)
    tmp, final, old = out / "state.tmp", out / "state", out / "state.old"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save({"step": step, "sched": sched.state_dict(), "rng": rng_state()}, tmp / f"extra_rank{rank()}.pt")
    barrier()
    if rank() == 0:
        write_json(tmp / COMPLETE, {"step": step, "world": dist.get_world_size() if is_dist() else 1})
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        _pause_for_tests(step)  # test-only hook (no-op unless BEYOND_SFT_PAUSE_IN_SAVE is set)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def _complete_states(out, world):
    """[(step, dir)] of the complete state dirs (COMPLETE marker and every rank's extra file)."""
    found = []
    for name in STATE_DIRS:
        d = Path(out) / name
        try:
            marker = json.loads((d / COMPLETE).read_text())
        except (OSError, ValueError):
            continue
        if marker.get("world") != world:
            raise UsageError(f"--resume: {d} was written by {marker.get('world')} rank(s); resume with the same "
                             f"number of processes ({world} now)")
        if all((d / f"extra_rank{r}.pt").exists() for r in range(world)) and (d / ".metadata").exists():
            found.append((int(marker["step"]), d))
    return found


def load_state(out, model, optim, sched):
    """--resume: restore the newest complete state among state/, state.old, state.tmp (model,
    optimizer, scheduler, RNG), cut metrics.jsonl, rollouts/ and checkpoints/ back to its step, and
    return that step. The extra state is read with torch.load(weights_only=True); DCP's own metadata
    is unpickled by torch.distributed.checkpoint: resume only from dirs you trust."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    world = dist.get_world_size() if is_dist() else 1
    msg, found = None, []
    try:
        found = _complete_states(out, world)
    except UsageError as e:
        msg = str(e)
    if is_dist():  # every rank must agree before any collective load
        msg, found = _broadcast_obj((msg, found))
    if msg:
        raise UsageError(msg)
    if not found:
        raise UsageError(f"--resume: no complete resumable state in {out} (looked in {', '.join(STATE_DIRS)})")
    step, path = max(found)
    barrier()
    if rank() == 0 and path.name != "state":  # make it state/ again, so the next save keeps it as state.old
        shutil.rmtree(Path(out) / "state", ignore_errors=True)
        os.replace(path, Path(out) / "state")
    barrier()
    path = Path(out) / "state"
    msd, osd = get_state_dict(model, optim)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    try:  # weights_only: tensors and plain containers only; a pickled object that would run code is refused
        extra = torch.load(path / f"extra_rank{rank()}.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f"--resume: {path / f'extra_rank{rank()}.pt'} holds more than tensors and plain data, "
                         f"refused (read with weights_only=True): {str(e).splitlines()[0]}") from None
    set_rng_state(extra["rng"])
    sched.load_state_dict(extra["sched"])
    truncate_metrics(out, extra["step"])
    if rank() == 0:
        for f in (Path(out) / "rollouts").glob("step_*.jsonl"):
            if f.stem[5:].isdigit() and int(f.stem[5:]) > step:
                f.unlink()
        for d in (Path(out) / "checkpoints").glob("step-*"):
            if d.name[5:].isdigit() and int(d.name[5:]) > step:
                shutil.rmtree(d)
    barrier()
    print0(f"resumed from {path} at step {extra['step']}")
    return extra["step"]


def rng_state():
    s = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def clip_grad_norm(model, max_norm):
    """Clip after the gradients are reduced; returns the global norm as a plain tensor (DTensor under FSDP2)."""
    g = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def cosine_lr(step, total, warmup):
    """Multiplier for LambdaLR: linear warmup over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def build_optimizer(params, name, lr, betas, weight_decay, device):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw8bit":
        if torch.device(device).type != "cuda":
            raise UsageError("--optim adamw8bit needs a CUDA device (bitsandbytes' 8-bit AdamW); use --optim adamw")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise UsageError(f"--optim adamw8bit needs bitsandbytes: {e}") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise UsageError(f"--optim must be adamw or adamw8bit, got {name!r}")


# ------------------------------------------------------------------------------------------------
# 7. logging and files

def write_json(path, obj):
    """Write JSON atomically (temp file + rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def append_jsonl(path, obj):
    """One os.write of one line with O_APPEND: processes append to the same file without interleaving
    (a local filesystem), and the line is in the kernel when this returns (a kill loses nothing before it)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(obj, ensure_ascii=False, default=float) + "\n").encode())
    finally:
        os.close(fd)


def write_jsonl(path, recs):
    """Write records as JSONL atomically (temp file + rename): a reader sees the old file or the new one."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, default=float) + "\n" for r in recs)
    os.replace(path + ".tmp", path)


class Logger:
    """Rank 0: one fixed-format line per step, the same keys to out/metrics.jsonl (and wandb if asked)."""

    def __init__(self, out, total_steps, wandb_project=None, args=None):
        self.out, self.total, self.wandb, self.t0 = out, total_steps, None, time.time()
        if rank() == 0 and wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, config=args)

    def log(self, step, metrics):
        if rank() != 0:
            return
        rec = {"step": step, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                               for k, v in metrics.items()}}
        line = " | ".join(f"{k} {_fmt(v)}" for k, v in rec.items() if k != "step")
        print(f"step {step}/{self.total} | {line}", flush=True)
        append_jsonl(os.path.join(self.out, "metrics.jsonl"), rec)
        if self.wandb is not None:
            self.wandb.log(rec, step=step)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def truncate_metrics(out, step):
    """On resume, drop metrics.jsonl lines past the restored step (they will be written again). A torn
    last line (a kill mid-write) is dropped with a warning; a bad line elsewhere is a DataError."""
    path = os.path.join(out, "metrics.jsonl")
    if rank() == 0 and os.path.exists(path):
        lines = [line for line in open(path) if line.strip()]
        keep = []
        for i, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                rec_step = rec["step"]
            except (ValueError, KeyError, TypeError):
                if i == len(lines):
                    print(f"warning: {path}: dropped a torn last line (row {i}): {line[:80]!r}", flush=True)
                    continue
                raise DataError(f"{path}: row {i}: not a metrics record") from None
            if rec_step <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------------
# 8. HTTP: evaluate.py's --api-url generation (engine.generate_api) and the AIR-Bench judge (reward.py)

class RequestFailed(UsageError):
    """An HTTP request that failed for good (after its retries, or a 4xx that retrying cannot fix)."""


def http_post(url, body, key=None, retries=5, backoff=1.0, timeout=3600, parse=None):
    """POST JSON, return parse(decoded reply) (the reply itself without parse); retries with exponential
    backoff on connection errors, timeouts, HTTP 408/409/429 and 5xx, and on malformed replies (not
    JSON, or a shape `parse` rejects with KeyError/IndexError/TypeError/ValueError). Other HTTP errors
    (400, 401, 404) stop at once. Raises RequestFailed."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode()
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as r:
                raw = r.read()
            try:
                d = json.loads(raw)
                return parse(d) if parse else d
            except (ValueError, KeyError, IndexError, TypeError):
                why = f"malformed reply {raw[:200]!r}"
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code not in (408, 409, 429):
                raise RequestFailed(f"{url}: HTTP {e.code}: {e.read()[:300]!r}") from None
            why = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            why = str(e)
        if attempt == retries:
            raise RequestFailed(f"{url}: {why} (after {retries + 1} tries)")
        time.sleep(backoff * 2 ** attempt)
