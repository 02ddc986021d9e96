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

Generation lives in engine.py. The algorithms (losses, advantages, masking) stay in the stage that owns them.
"""
import csv
import json
import math
import os
import random
import shutil
import sys
import time
from collections import namedtuple
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn


class UsageError(ValueError):
    """A problem with what the user passed (path, flag value): printed without a traceback."""


class DataError(UsageError):
    """A bad data file or row; the message names the file, the 1-based row and the field."""


def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


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
    to the interpreter's exit can abort the process)."""
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


def load_tokenizer(path, trust_remote_code=False, require_chat_template=True):
    from transformers import AutoTokenizer
    p = _check_path(path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UsageError(f"cannot load tokenizer from {path}: {e}") from None
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
#       reasoning first; the split below handles the formats those model cards document

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


def render_prompt_text(tok, prompt, chat_kwargs=None):
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                                   **(chat_kwargs or {}))


def render_prompt(tok, prompt, chat_kwargs=None):
    """One user turn, add_generation_prompt=True -> token ids (the template writes any special tokens)."""
    return tok.encode(render_prompt_text(tok, prompt, chat_kwargs), add_special_tokens=False)


def end_of_turn(tok, chat_kwargs=None):
    """The text the template writes right after an assistant message (e.g. '<|im_end|>\\n'); else eos."""
    probe = "\x00PROBE\x00"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    try:
        text = tok.apply_chat_template(msgs, tokenize=False, **(chat_kwargs or {}))
        tail = text[text.rindex(probe) + len(probe):]
    except Exception:
        tail = ""
    return tail if tail.strip() else (tok.eos_token or "")


def render_sft(tok, prompt, response, max_len=None, chat_kwargs=None):
    """SFT target: rendered prompt + the response text + end-of-turn, appended by hand, so templates that
    strip past reasoning (R1-Distill) cannot drop it. Returns (ids, loss_mask) with the mask True on the
    response and end-of-turn tokens. Longer than max_len: the LAST max_len tokens are kept (left truncation,
    as the STAR-1 recipe), so the end of the reasoning, the answer and the end-of-turn stay in the target;
    the prompt's head goes first."""
    ptext = render_prompt_text(tok, prompt, chat_kwargs)
    if ptext.rstrip().endswith("<think>") and response.lstrip().startswith("<think>"):
        response = response.lstrip()[len("<think>"):].lstrip("\n")  # the template already opened it
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


def reasoning_spans(text):
    """Character spans of the split: ((r0, r1), (a0, a1), think_closed); text[r0:r1] is the reasoning,
    text[a0:a1] the answer (empty when the thinking never closed). Unstripped: entropy.py maps tokens
    to segments with these offsets."""
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


def split_reasoning(text):
    """Split on the LAST </think> (or Granite's markers, above): (reasoning minus a leading <think>,
    answer, think_closed), both stripped."""
    (r0, r1), (a0, a1), closed = reasoning_spans(text)
    return text[r0:r1].strip(), text[a0:a1].strip(), closed


# ------------------------------------------------------------------------------------------------
# 6. checkpoints: Hugging Face export + resumable sharded state, both atomic

def hf_of(model):
    return model.hf if isinstance(model, Policy) else model


def save_hf(model, tok, out, export_dtype=None):
    """Gather the full state dict to rank 0 and write a from_pretrained-loadable dir into `out`
    (config, safetensors, tokenizer, generation_config). Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    hf = hf_of(model)
    if is_dist():
        sd = get_model_state_dict(hf, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in hf.state_dict().items()}
    if rank() == 0:
        tmp = Path(out) / ".export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if export_dtype is not None:
            sd = {k: v.to(export_dtype) if v.is_floating_point() else v for k, v in sd.items()}
            hf.config.dtype = export_dtype
        hf.save_pretrained(tmp, state_dict=sd)
        tok.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, Path(out) / f.name)
        tmp.rmdir()
    barrier()


def save_state(out, model, optim, sched, step):
    """Sharded model + optimizer (torch.distributed.checkpoint) and per-rank extra state (step, which
    fixes the data position; scheduler; RNG) into out/state, atomically: write state.tmp, then rename."""
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
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_state(out, model, optim, sched):
    """--resume: restore what save_state wrote (model, optimizer, scheduler, RNG), drop the
    metrics.jsonl lines past the restored step, and return that step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = Path(out) / "state"
    if not (path / f"extra_rank{rank()}.pt").exists():
        raise UsageError(f"--resume: no resumable state for rank {rank()} in {path}")
    msd, osd = get_state_dict(model, optim)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    extra = torch.load(path / f"extra_rank{rank()}.pt", weights_only=False)
    set_rng_state(extra["rng"])
    sched.load_state_dict(extra["sched"])
    truncate_metrics(out, extra["step"])
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
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=float) + "\n")


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
    """On resume, drop metrics.jsonl lines past the restored step (they will be written again)."""
    path = os.path.join(out, "metrics.jsonl")
    if rank() == 0 and os.path.exists(path):
        keep = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
