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
import errno
import glob
import http.client
import io
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import namedtuple
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn


class UsageError(ValueError):
    """A problem with what the user passed (path, flag value, model dir): exit 2, one line, no traceback."""


class DataError(UsageError):
    """A bad data file or row; the message names the file, the 1-based row and the field."""


class StopRun(RuntimeError):
    """A run stopped on purpose (a non-finite value, --max-kl, too many failed requests) or by a full disk:
    exit 1, one line saying what is intact."""


class NonFiniteError(StopRun):
    """A non-finite loss, gradient norm or weight: the run stops before anything non-finite is written."""


class DiskFull(StopRun):
    """A write that ran out of space (full disk, quota, file-size limit): its temp file is removed and the
    previous complete output is left as it was."""


DEBUG_ENV = "BEYOND_SFT_DEBUG"  # set to 1: every error shows its traceback


def first_line(e):
    """An exception's message, first line only (library messages run to pages)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def cli_main(main, argv=None):
    """Run a stage's main(argv) as a CLI, with the failure policy every CLI shares: 0 done; 2 a usage or
    input error (a flag, a path, a data row, a model dir, an unwritable --out); 1 a run stopped on purpose
    or by a full disk (StopRun). Either is ONE line on stderr, `error: ...`, naming what to fix, and no
    traceback unless BEYOND_SFT_DEBUG=1; any other exception is a bug and shows its traceback. Under
    torchrun it ends with finish()."""
    try:
        main() if argv is None else main(argv)
        finish()
    except (UsageError, StopRun, OSError) as e:
        release_out_dirs()
        if isinstance(e, OSError):  # a write no writer named: a full disk or a read-only filesystem is still the user's
            e = write_error(e.filename, e, cleaned=False) if e.errno in _DISK_FULL + (errno.EROFS,) else None
            if e is None:
                raise
        if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise
        die(str(e), 2 if isinstance(e, UsageError) else 1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (`error: argument --x: ...`) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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
    if args.allow_changes and not args.resume:
        raise UsageError("--allow-changes goes with --resume (it lets a resumed run change its flags)")


# The smallest sampling / scoring temperature τ. Every stage divides the logits by τ (the sampler, the
# (log p, H) head and its backward, which multiplies by 1/τ). τ >= 0.01 keeps z/τ within 100 |z|, finite for
# every logit |z| < 3.4e36 in bf16 and fp32 alike (both top out at 3.4e38), and the backward's 1/τ factor
# within 100, so a gradient norm that is finite at τ = 1 stays finite (its fp32 sum of squares gains at most
# 1e4). At τ = 1e-40, 1/τ is inf in fp32 itself. At τ = 0.01 a logit gap of 0.1 already weighs e^10: for
# less randomness use temperature 0 (greedy) where the stage offers it.
TEMPERATURE_MIN = 0.01


def check_temperature(t, flag="--temperature", greedy_ok=False):
    """A sampling temperature: finite and >= TEMPERATURE_MIN, or 0 (greedy) where greedy_ok."""
    if t is None or (greedy_ok and t == 0):
        return
    if not (math.isfinite(t) and t >= TEMPERATURE_MIN):
        raise UsageError(f"{flag} must be {'0 (greedy) or ' if greedy_ok else ''}a finite value >= {TEMPERATURE_MIN} "
                         f"(smaller ones overflow the tempered logits z/τ), got {t}")


def check_sampling(args, greedy_ok=False):
    """--temperature >= TEMPERATURE_MIN (or 0 = greedy where the stage supports it) and 0 < --top-p <= 1."""
    check_temperature(args.temperature, greedy_ok=greedy_ok)
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
    _check_writable(d, flag)


def check_out_dir(path, flag="--out"):
    """An output DIR can be written, checked before any work: an existing dir is writable, or the nearest
    existing parent of a new one is (it is created later, by the run)."""
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise UsageError(f"{flag} {path} is a file, not a directory")
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UsageError(f"{flag} {path}: {p} is a file, not a directory")
    _check_writable(p, flag)


def _check_writable(d, flag):
    """access(2) says EROFS for a read-only filesystem even to root, EACCES for missing permissions."""
    if not os.access(d, os.W_OK | os.X_OK):
        ro = os.statvfs(d).f_flag & os.ST_RDONLY
        raise UsageError(f"{flag}: {d} is {'on a read-only filesystem' if ro else 'not writable'}; "
                         f"pick a writable {flag}")


# ------------------------------------------------------------------------------------------------
# 1. compute

Dist = namedtuple("Dist", "rank local_rank world device")
DIST_TIMEOUT_MIN = 60.0


def dist_minutes(text):
    """argparse type of --dist-timeout: minutes, finite, in (0, 10080] (a week; timedelta overflows past ~1e12)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number of minutes, got {text!r}") from None
    if not (math.isfinite(v) and 0 < v <= 10080):
        raise argparse.ArgumentTypeError(f"must be in (0, 10080] minutes (and finite), got {text}")
    return v


def add_compute_flags(a):
    """--device and --dist-timeout (a: an argument group's add_argument), for the stages run under torchrun."""
    a("--device", default="auto", choices=["auto", "cuda", "cpu"],
      help="where to run: auto = CUDA when torch sees a GPU, else the CPU; auto stops with the likely cause when "
           "this machine has an NVIDIA GPU that torch cannot use; cuda stops when none is usable")
    a("--dist-timeout", type=dist_minutes, default=DIST_TIMEOUT_MIN, metavar="MIN",
      help="minutes a collective may wait under torchrun before the job is stopped (the NCCL / gloo timeout); the "
           "long, uneven waits (a rank still generating, rank 0 loading the checkpoint or writing a save, another "
           "grading) wait outside any collective, without a time limit")


def nvidia_driver():
    """The NVIDIA kernel driver's version when this machine has one loaded ('580.65.06'), '' when a GPU device
    node exists but the version is unreadable, else None."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", f.read())
        return m.group(1) if m else ""
    except OSError:
        return "" if glob.glob("/dev/nvidia[0-9]*") else None


def no_gpu_reason():
    """Why torch sees no CUDA device, in one sentence naming the likely cause."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build; install the CUDA build "
                f"(README, 'GPU install')")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU"
    drv = nvidia_driver()
    if drv is None:
        return "no NVIDIA driver is loaded on this machine (/proc/driver/nvidia/version is missing)"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} and the NVIDIA driver "
            f"{drv or '(version unknown)'} cannot run it: CUDA 13 builds need driver >= 580, CUDA 12.x builds "
            f">= 525; update the driver or install torch from PyTorch's CUDA 12.x index (README, 'GPU install')")


def resolve_device(device="auto"):
    """'auto' | 'cuda' | 'cpu' -> 'cuda' or 'cpu'. No silent CPU run on a GPU machine: 'cuda' without a usable
    GPU, or 'auto' on a machine with an NVIDIA driver but no GPU torch can use, stops with the likely cause;
    'cpu' (or 'auto' on a machine without an NVIDIA GPU) runs on the CPU."""
    if device not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device must be auto, cuda or cpu, got {device!r}")
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda" or nvidia_driver() is not None:
        asked = "--device cuda" if device == "cuda" else "this machine has an NVIDIA GPU"
        raise UsageError(f"{asked}, but torch sees no usable GPU: {no_gpu_reason()}. "
                         f"Pass --device cpu to run on the CPU on purpose.")
    return "cpu"


def init_dist(device="auto", timeout_min=DIST_TIMEOUT_MIN):
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE: NCCL on CUDA (bound to this rank's GPU at init; CPU tensors
    through gloo), gloo on the CPU, both with a `timeout_min` collective timeout. Otherwise one process, no
    group. The device comes from resolve_device: a GPU machine whose GPUs torch cannot use stops here,
    before any model loads."""
    from datetime import timedelta
    if not (isinstance(timeout_min, (int, float)) and 0 < timeout_min < math.inf):
        raise UsageError(f"--dist-timeout must be a positive number of minutes, got {timeout_min}")
    cuda = resolve_device(device) == "cuda"
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {local_rank} but torch sees {torch.cuda.device_count()} GPU(s): "
                             f"--nproc_per_node is larger than the GPUs visible (CUDA_VISIBLE_DEVICES?)")
        torch.cuda.set_device(dev)
    if not dist.is_initialized():  # CUDA: NCCL for GPU tensors, gloo for CPU ones (--cpu-offload's gradient norm)
        kw = {"device_id": dev} if cuda else {}
        backend = "cuda:nccl,cpu:gloo" if cuda else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min), **kw)
    return Dist(rank, local_rank, world, dev)


def is_dist():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_dist() else 0


def finish():
    """End a torchrun process cleanly: every rank here (`barrier`), a collective barrier, then tear the process
    group down (a gloo group left to the interpreter's exit can abort the process). Also releases the
    output-dir lock."""
    release_out_dirs()
    if is_dist():
        barrier()
        dist.barrier()
        dist.destroy_process_group()


def print0(*a, **kw):
    if rank() == 0:
        print(*a, **kw, flush=True)


_barriers = [0]


def barrier():
    """Every rank reaches this point before any goes on, waiting OUTSIDE a collective: each rank adds 1 to a
    counter in the process group's store, then polls it (every <= 0.5 s) until it reads the world size.
    A collective barrier would wait inside NCCL / gloo, whose --dist-timeout stops the job; here a rank
    may wait as long as another takes (generating, loading, writing a checkpoint, grading). A rank that
    dies ends the job through torchrun. Ranks call barrier() in the same order (the key counts calls)."""
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

def _check_path(path, what):
    """A path that looks local (starts with ./, /, ~, or has two slashes) must exist; a hub id passes."""
    p = os.path.expanduser(str(path))
    looks_local = p.startswith((".", "/", "~")) or p.count("/") > 1  # a hub id is "org/name"
    if looks_local and not os.path.exists(p):
        raise UsageError(f"{what} path does not exist: {path}")
    return p


# Files a tokenizer loads from: the fast tokenizer's tokenizer.json, a sentencepiece model (Llama / Gemma's
# tokenizer.model, DeBERTa-v3's spm.model, XLM-R's sentencepiece.bpe.model), or a slow BPE / WordPiece vocab.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spm.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "tiktoken.model")
HEADS = {"causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "a causal language model (AutoModelForCausalLM)"),
         "seq-cls": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                     "a sequence classifier (AutoModelForSequenceClassification)")}


def read_config(path, what="--model"):
    """config.json of a local dir or a hub id, as a plain dict (no config class is built, so an unknown
    model_type can be named)."""
    from transformers import PretrainedConfig
    p = _check_path(path, what)
    try:
        return PretrainedConfig.get_config_dict(p)[0]
    except (OSError, ValueError) as e:
        raise UsageError(f"{what} {path}: cannot read its config.json ({first_line(e)})") from None


def check_model(path, what="--model", head="causal-lm", trust_remote_code=False):
    """A model dir checked before any weight is read and before the first collective, each problem one
    line naming the dir: config.json names a model_type this transformers knows and, for it, a `head`
    ("causal-lm", or "seq-cls" for a reward model); a local dir has tokenizer files and
    safetensors files whose headers are complete and as long as they say (a cut download). A hub id
    gets the config check (its files are fetched at load). Returns the config dict."""
    from transformers.models.auto import configuration_auto, modeling_auto
    cfg = read_config(path, what)
    mt = cfg.get("model_type")
    if not (trust_remote_code and "auto_map" in cfg):  # a model with its own code names its own classes
        if mt not in configuration_auto.CONFIG_MAPPING_NAMES:
            import transformers
            raise UsageError(f"{what} {path}: config.json has model_type {mt!r}, unknown to transformers "
                             f"{transformers.__version__} (a newer transformers, or --trust-remote-code for a model "
                             f"that ships its own code)")
        names, kind = HEADS[head]
        if mt not in getattr(modeling_auto, names):
            raise UsageError(f"{what} {path}: model_type {mt!r} (architectures {cfg.get('architectures')}) "
                             f"is not {kind}")
    p = os.path.expanduser(str(path))
    if os.path.isdir(p):
        _check_tokenizer_files(p, what, path)
        for f in _safetensors_files(p, what, path):
            _check_safetensors(os.path.join(p, f), what, path)
    return cfg


def _check_tokenizer_files(p, what, path):
    if os.path.isdir(p) and not any(os.path.isfile(os.path.join(p, f)) for f in TOKENIZER_FILES):
        raise UsageError(f"{what} {path}: no tokenizer files (tokenizer.json, or a sentencepiece model such as "
                         f"tokenizer.model)")


def _safetensors_files(p, what, path):
    """The weight files of a local dir: those its model.safetensors.index.json names, else *.safetensors."""
    index = os.path.join(p, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            files = sorted(set(json.loads(read_text(index))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{what} {path}: model.safetensors.index.json has no weight_map") from None
    else:
        files = sorted(f for f in os.listdir(p) if f.endswith(".safetensors"))
    if not files:
        raise UsageError(f"{what} {path}: no safetensors weights (model.safetensors or model.safetensors.index.json)")
    return files


def _check_safetensors(f, what, path):
    """A safetensors file is 8 bytes of header length n, n bytes of JSON header, then the tensor data, whose
    extent the header's data_offsets give: a shorter file is a cut download or a failed write."""
    name = os.path.basename(f)
    if not os.path.isfile(f):
        raise UsageError(f"{what} {path}: weight file {name} is missing (named by model.safetensors.index.json)")
    size = os.path.getsize(f)
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little") if size >= 8 else -1
        try:
            header = json.loads(fh.read(n)) if 0 <= n <= size - 8 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise UsageError(f"{what} {path}: {name} has no complete safetensors header ({size} bytes): a truncated "
                         f"or corrupt file; download or export it again")
    need = 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size < need:
        raise UsageError(f"{what} {path}: {name} is truncated ({size} of {need} bytes); download or export it again")


def model_context(cfg):
    """The longest sequence (prompt + completion) a model config is made for, in tokens, or None when it does
    not say: max_position_embeddings (or n_positions / seq_length), stretched by a RoPE scaling factor when
    that factor applies to it (YaRN / linear / dynamic over original_max_position_embeddings), as vLLM reads it."""
    cfg = cfg.get("text_config") or cfg
    n = next((cfg[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
              if isinstance(cfg.get(k), int)), None)
    rope = cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if n and kind in ("yarn", "linear", "dynamic") and rope.get("original_max_position_embeddings", n) == n:
        n = int(n * float(rope.get("factor", 1.0)))
    return n


ROUND_TRIP = "a b c"  # what every tokenizer must give back unchanged: decode(encode(ROUND_TRIP))


def load_tokenizer(path, trust_remote_code=False, require_chat_template=True, what="tokenizer"):
    """The checkpoint's tokenizer, refused unless decode(encode("a b c")) == "a b c": a tokenizer that loses
    spaces would silently corrupt every target, rollout, reward input and grade. The known cause is a
    transformers version that loads the checkpoint as another tokenizer: transformers 5.17 loads
    DeepSeek-R1-Distill-Llama (tokenizer_class LlamaTokenizerFast over a ByteLevel tokenizer.json) as a
    Metaspace tokenizer, and "Is it worth me being alive?" comes back "Isitworthmebeingalive?"."""
    import transformers
    from transformers import AutoTokenizer
    p = _check_path(path, what)
    _check_tokenizer_files(p, what, path)
    try:
        tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a missing / broken file of the user's dir
        raise UsageError(f"{what} {path}: cannot load its tokenizer ({type(e).__name__}: {first_line(e)})") from None
    back = tok.decode(tok.encode(ROUND_TRIP, add_special_tokens=False), skip_special_tokens=True)
    if back != ROUND_TRIP:
        raise UsageError(f"{what} {path}: its tokenizer ({type(tok).__name__}) loses text: decode(encode("
                         f"{ROUND_TRIP!r})) = {back!r}, which would corrupt every target, rollout, reward input and "
                         f"grade. The known cause is the transformers version (installed: {transformers.__version__}): "
                         f"5.17 loads DeepSeek-R1-Distill-Llama's tokenizer (tokenizer_class LlamaTokenizerFast over a "
                         f"ByteLevel tokenizer.json) as a Metaspace one and drops every space; install the versions "
                         f"requirements.txt pins")
    if require_chat_template and not tok.chat_template:
        raise UsageError(f"{what} {path}: its tokenizer has no chat template (chat_template.jinja or "
                         f"tokenizer_config.json chat_template)")
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
    except (OSError, ValueError) as e:  # a hub id check_model could not look into
        raise UsageError(f"cannot load model from {path}: {first_line(e)}") from None
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
    barrier()  # ranks 1..N wait here, not inside the first collective, while rank 0 downloads and loads
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


def read_text(path):
    """A text file as str: UTF-8, a leading byte-order mark dropped (a CSV saved by Excel keeps its first
    column's name). A byte that is not UTF-8 is a DataError naming the file, the line and the byte."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"{path}: line {line}: byte 0x{data[e.start]:02x} at column {col} is not UTF-8 "
                        f"(save the file as UTF-8)") from None


def read_jsonl(path):
    rows = []
    for i, line in enumerate(read_text(path).split("\n"), 1):  # only \n ends a line (not U+2028 inside a string)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: row {i}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_csv(path):
    """CSV rows as dicts keyed by the header; a row with more fields than the header is a DataError."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        rows = [dict(r) for r in reader]
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    for i, r in enumerate(rows, 1):
        if None in r:
            raise DataError(f"{path}: row {i}: {len(reader.fieldnames) + len(r[None])} fields, the header has "
                            f"{len(reader.fieldnames)} (an unquoted comma?)")
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
            raise DataError(f"{spec}: {'is a directory, not a file' if os.path.isdir(spec) else 'file not found'}")
        if ext == ".jsonl":
            return read_jsonl(spec)
        if ext == ".json":
            try:
                data = json.loads(read_text(spec))
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
            return read_csv(spec)
        if ext == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            try:
                return pq.read_table(spec).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{spec}: not a readable parquet file ({first_line(e)})") from None
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
# what an export copies from the input checkpoint: the files a tokenizer loads from, and its config and template
TOKENIZER_EXPORT_FILES = TOKENIZER_FILES + ("tokenizer_config.json", "special_tokens_map.json",
                                            "added_tokens.json", "merges.txt", "chat_template.jinja",
                                            "chat_template.json")


def save_tokenizer(tok, out):
    """The export's tokenizer: the files of the checkpoint it was loaded from (`tok.name_or_path`, a dir or a
    hub id in the local cache), copied byte for byte, so whatever loaded the input checkpoint (vLLM,
    another transformers version) loads the export the same way; tok.save_pretrained would rewrite them
    (tokenizer_class, added tokens, the template moved to its own file). A tokenizer with no files on
    disk is saved by save_pretrained."""
    from huggingface_hub import try_to_load_from_cache
    src, found = str(tok.name_or_path), []
    for name in TOKENIZER_EXPORT_FILES:
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
    if ready.is_symlink():  # not one this code made: never followed (its target's files are not ours to move)
        ready.unlink()
    if not ready.is_dir():
        return
    names = {f.name for f in ready.iterdir()}
    for f in Path(out).iterdir():
        stale = f.name.startswith(HF_WEIGHT_PREFIXES) or f.name in TOKENIZER_EXPORT_FILES
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
    A failed write (a full disk) removes the half export and stops every rank: the previous export stays.
    Collective: every rank must call it."""
    check_finite_weights(model, step)
    hf = hf_of(model)
    sd = _full_state_dict(model)
    out = Path(out)
    tmp, ck = out / ".export.tmp", out / "checkpoints"
    # the bytes the export needs (for a full disk's message): each tensor once, in the dtype it is saved in
    need = sum({v.data_ptr(): v.numel() * (export_dtype.itemsize if export_dtype is not None and v.is_floating_point()
                                           else v.element_size()) for v in sd.values()}.values())
    if rank() == 0 and export_dtype is not None:
        sd = {k: v.to(export_dtype) if v.is_floating_point() else v for k, v in sd.items()}
        hf.config.dtype = export_dtype

    def export():  # rank 0
        install_export(out)  # a previous install cut short
        fresh_dir(tmp)  # made here: never a planted link
        hf.save_pretrained(tmp, state_dict=sd)
        save_tokenizer(tok, tmp)
        if checkpoint:
            ck.mkdir(exist_ok=True)
            fresh_dir(ck / f".step-{step}.tmp")
            shutil.copytree(tmp, ck / f".step-{step}.tmp", copy_function=_link_or_copy, dirs_exist_ok=True)
            remove(ck / f"step-{step}")
            os.replace(ck / f".step-{step}.tmp", ck / f"step-{step}")
            done = sorted((int(d.name[5:]) for d in ck.glob("step-*") if d.name[5:].isdigit()), reverse=True)
            for old_step in done[keep:] if keep else []:
                shutil.rmtree(ck / f"step-{old_step}", ignore_errors=True)
        remove(out / ".export.ready")
        os.replace(tmp, out / ".export.ready")  # the commit point: a complete export exists
        install_export(out)
    write_on_every_rank(export if rank() == 0 else None, (tmp, ck / f".step-{step}.tmp"), need,
                        f"the export into {out}")


def write_on_every_rank(write, temps, need=None, what=None):
    """Collective: write() (this rank's part of a save; None: nothing); a write error on any rank (a full
    disk, a read-only dir) removes the temp paths `temps` and is raised on every rank, so no rank waits at
    the next collective for one that stopped, and nothing half-written is left beside the previous save."""
    err = None
    try:
        if write is not None:
            write()
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        err = e if isinstance(e, (UsageError, DiskFull)) else write_error(temps[0], e, need, what=what)
        if err is None:
            raise
    if is_dist():
        err = next((x for x in gather_objects([err]) if x is not None), None)
    if err is not None:
        if rank() == 0:
            for t in temps:
                remove(t)
        raise err


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
                    remove(os.path.join(out, n))  # a link among them goes, never its target
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
    device = comm_device()
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
    point leaves at least one complete state dir; load_state picks the newest. A failed write (a full disk)
    removes state.tmp and stops every rank (write_on_every_rank): the previous state stays. The stages call
    it after save_hf, which has already refused non-finite weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    out = Path(out)
    tmp, final, old = out / "state.tmp", out / "state", out / "state.old"
    write_on_every_rank((lambda: fresh_dir(tmp)) if rank() == 0 else None, (tmp,))  # never a planted link
    msd, osd = get_state_dict(model, optim)

    def write():  # every rank: its shards and its extra state
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        buf = io.BytesIO()  # written by write_files: a full disk is an OSError naming the file
        torch.save({"step": step, "sched": sched.state_dict(), "rng": rng_state()}, buf)
        write_files({tmp / f"extra_rank{rank()}.pt": buf.getvalue()})
    write_on_every_rank(write, (tmp,), _nbytes((msd, osd)))
    marker = {"step": step, "world": dist.get_world_size() if is_dist() else 1}
    write_on_every_rank((lambda: write_json(tmp / COMPLETE, marker)) if rank() == 0 else None, (tmp,))
    if rank() == 0:
        if final.exists():
            remove(old)
            os.replace(final, old)
        _pause_for_tests(step)  # test-only hook (no-op unless BEYOND_SFT_PAUSE_IN_SAVE is set)
        os.replace(tmp, final)
        remove(old)
    barrier()


def _nbytes(obj):
    """Bytes of the tensors in a nested state dict (this rank's shards of a DTensor)."""
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if torch.is_tensor(obj):
        t = obj.to_local() if hasattr(obj, "to_local") else obj
        return t.numel() * t.element_size()
    return 0


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


# --- reading a state runs no code from it -------------------------------------------------------------
# torch.distributed.checkpoint (DCP) reads state/.metadata with pickle.load and every non-tensor item of
# the sharded state (the optimizer's param_groups values) with torch.load(weights_only=False): a crafted
# state/ would run code on --resume. load_state reads the metadata with an Unpickler that builds only
# DCP's own metadata classes (below), and each non-tensor item with weights_only=True (plain data only);
# DCP reads the tensor items with weights_only=True itself, and the extra state is read the same way.

def _metadata_globals():
    """(module, name) -> object: everything a DCP .metadata pickle may name (torch 2.13 writes the
    dataclasses of torch.distributed.checkpoint.metadata, _StorageInfo, torch.Size, dtypes, layouts by
    name and the checkpoint's path); constructing any of them runs no code of the file's choosing."""
    import pathlib
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md
    ok = {(md.__name__, n): c for n, c in vars(md).items() if isinstance(c, type) and c.__module__ == md.__name__}
    ok.update({("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    ok.update({(fs.__name__, "_StorageInfo"): fs._StorageInfo, ("torch", "Size"): torch.Size,
               ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
               ("pathlib", "PosixPath"): pathlib.PosixPath, ("pathlib", "PurePosixPath"): pathlib.PurePosixPath})
    return ok


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only _metadata_globals(): os.system, builtins.eval, ... are refused."""

    def __init__(self, file):
        super().__init__(file)
        self.allowed = _metadata_globals()

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not a checkpoint metadata class") \
                from None


def read_state_metadata(path):
    """DCP's Metadata of the state dir `path`, unpickled by _MetadataUnpickler and checked: every storage
    item lies in a plain file of `path` with no load transforms. Raises UsageError naming the file."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
    f = Path(path) / ".metadata"
    try:
        with open(f, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
        if not isinstance(md, Metadata):
            raise pickle.UnpicklingError(f"it holds a {type(md).__name__}, not a checkpoint Metadata")
        for info in md.storage_data.values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or \
                    getattr(info, "transform_descriptors", None):
                raise pickle.UnpicklingError(f"a storage item points at {name!r}, not a shard file of the state")
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError) as e:
        raise UsageError(f"--resume: {f}: {e}; refused (resume only from a state this code wrote)") from None
    md.storage_meta = md.storage_meta or StorageMeta()
    return md


def _load_error(e):
    """The line of a failed read that says what was wrong (for torch.load(weights_only=True): which global
    it refused, not its advice to retry with weights_only=False)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
    return (lines[1] if len(lines) > 1 and lines[0].startswith("Weights only load failed") else lines[0]).rstrip(".")


def _dcp_load(sd, path):
    """dcp.load(sd) from the state dir `path` without unpickling anything that could run code."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    md = read_state_metadata(path)

    class Reader(dcp.FileSystemReader):
        def read_metadata(self):  # no **kwargs: DCP then never falls back to per-rank metadata files
            md.storage_meta.load_id = self.load_id
            return md

    class Planner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            # DCP's own load_bytes reads the item with torch.load(weights_only=False): read it here with
            # weights_only=True (plain data or refused), then hand DCP that data re-serialized
            obj, buf = torch.load(value, weights_only=True), io.BytesIO()
            torch.save(obj, buf)
            buf.seek(0)
            super().load_bytes(read_item, buf)

    try:
        dcp.load(sd, storage_reader=Reader(path), planner=Planner())
    except CheckpointException as e:  # a BaseException: one per failed rank, each with its traceback
        why = _load_error(next(iter(e.failures.values()))[0])
        raise UsageError(f"--resume: cannot read the sharded state in {path}: {why}; refused") from None


def load_state(out, model, optim, sched):
    """--resume: restore the newest complete state among state/, state.old, state.tmp (model,
    optimizer, scheduler, RNG), cut metrics.jsonl, rollouts/ and checkpoints/ back to its step, and
    return that step. Nothing in the state can run code: the extra state is read with
    torch.load(weights_only=True), the sharded state through _dcp_load."""
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
    _dcp_load(sd, path)
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    try:  # weights_only: tensors and plain containers only; a pickled object that would run code is refused
        extra = torch.load(path / f"extra_rank{rank()}.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f"--resume: {path / f'extra_rank{rank()}.pt'} holds more than tensors and plain data, "
                         f"refused (read with weights_only=True): {_load_error(e)}") from None
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


# --- --resume keeps the run's flags ---------------------------------------------------------------------

# Flags that change no number of a run: where it stops, how often it saves, dumps and logs, what it may
# load. Every other flag (model, data, optimizer, schedule, batch and sampling settings, estimator, seed,
# dtype, memory layout) can change what the steps compute, so --resume compares it with the run's args.json.
RESUME_FREE = ("stop_at", "save_every", "keep_checkpoints", "dump_every", "wandb", "max_kl", "reflection_words",
               "trust_remote_code")
_NOT_RUN_FLAGS = ("out", "resume", "overwrite", "allow_changes")  # how this start was asked for, not the run


def _flag(dest):
    return "--" + dest.replace("_", "-")


def _shown(v):
    """A flag's value as a user types it: unset, on / off, a list space-separated, JSON for an object."""
    if v is None or isinstance(v, bool):
        return {None: "unset", True: "on", False: "off"}[v]
    return " ".join(map(str, v)) if isinstance(v, list) else json.dumps(v) if isinstance(v, dict) else str(v)


def run_flags(out):
    """(args.json as written, the flags the run in OUT now has: args.json's with every change an earlier
    --allow-changes recorded applied in order); (None, None) when OUT has no args.json."""
    path = Path(out) / "args.json"
    if not path.exists():
        return None, None
    try:
        rec = json.loads(path.read_text())
        flags = {k: v for k, v in rec.items() if k != "changes"}
        for ch in rec.get("changes", []):
            flags.update((k, new) for k, (_, new) in ch["flags"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--resume: {path} is not a run's flags ({e}); cannot check the flags of this start "
                         f"against the run") from None
    return rec, flags


def resume_changes(args):
    """--resume: the flags of this start that differ from the run's ({dest: [the run's value, the new one]}),
    checked before any model loads. Refuses (UsageError naming each flag and both values) a change of
    a flag outside RESUME_FREE unless --allow-changes; then write_args records it. Every rank reads
    the same args.json and so takes the same branch."""
    _, flags = run_flags(args.out)
    if flags is None:  # no args.json: the run never got past its start, load_state finds no state
        return {}
    new = json.loads(json.dumps(vars(args), default=str))  # as args.json holds it (tuples as lists)
    changes = {k: [flags.get(k), v] for k, v in new.items() if k not in _NOT_RUN_FLAGS and flags.get(k) != v}
    fixed = {k: ch for k, ch in changes.items() if k not in RESUME_FREE}
    if fixed and not args.allow_changes:
        what = ", ".join(f"{_flag(k)} {_shown(v)} (the run's: {_shown(old)})" for k, (old, v) in fixed.items())
        raise UsageError(f"--resume: {what} would change the run in {args.out} (its args.json); resume with the "
                         f"run's values, or add --allow-changes to continue with the new ones (both are kept in "
                         f"args.json)")
    return changes


def write_args(args, step=0, changes=None):
    """Rank 0: OUT/args.json holds the flags of the run's first start; a resume never rewrites them, it
    appends {"after_step": S, "flags": {dest: [old, new]}} to its "changes" list when a flag changed (the
    steps after S ran with the new values)."""
    rec, _ = run_flags(args.out) if args.resume else (None, None)
    if rec is None:
        rec = vars(args)
    elif changes:
        rec.setdefault("changes", []).append({"after_step": step, "flags": changes})
    write_json(Path(args.out) / "args.json", rec)


def apply_optimizer_flags(optim, sched, lr, betas, weight_decay):
    """--resume --allow-changes: the restored optimizer and scheduler carry the run's lr, betas and weight
    decay; set the new ones, and each group's lr to lr × the (new) schedule at the restored step, the value
    LambdaLR would have set."""
    sched.base_lrs = [lr] * len(optim.param_groups)
    for g, f in zip(optim.param_groups, sched.lr_lambdas):
        g.update(initial_lr=lr, lr=lr * f(sched.last_epoch), betas=tuple(betas), weight_decay=weight_decay)
    sched._last_lr = [g["lr"] for g in optim.param_groups]


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

# --- writes: a temp file beside its target, created exclusively, then renamed over it -----------------

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _size(n):
    return next(f"{n / k:.1f} {u}" for k, u in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")) if n >= k) \
        if n >= 1024 else f"{n} bytes"


def write_error(path, e, need=None, cleaned=True, what=None):
    """The one-line error for an exception `e` raised while writing `path`, or None when `e` is not a write
    failure: DiskFull (exit 1) for a full disk, a quota or the file-size limit, with the bytes needed (when
    known) and free; UsageError (exit 2) for a read-only or unwritable place. `what` names the write in the
    message (default: the path). Libraries that wrap the OS error (safetensors, torch.distributed.checkpoint)
    are read by the errno their message carries."""
    import re
    path = path or getattr(e, "filename", None) or "a file"
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(d):
        d = os.path.dirname(d)
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = re.search(r"(?:\[Errno |os error )(\d+)", str(e))
        code = int(m.group(1)) if m else None
    if code is None and re.search(r"unexpected pos \d+ vs|file write failed", str(e)):
        # torch.save's zip writer drops the errno: a full disk is one with nothing left, else the size limit
        code = errno.ENOSPC if shutil.disk_usage(d).free < max(need or 0, 1 << 20) else \
            errno.EFBIG if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY else None
    if code not in _DISK_FULL + _NOT_WRITABLE:
        return None
    msg = f"cannot write {what or path}: {os.strerror(code)}"
    if code in _NOT_WRITABLE:
        return UsageError(f"{msg}; write somewhere writable")
    if code == errno.EFBIG:
        return DiskFull(f"{msg} (over the file-size limit, `ulimit -f`{f'; it needs {_size(need)}' if need else ''})")
    need = f"needs about {_size(need)}, " if need else ""
    return DiskFull(f"{msg} ({need}{_size(shutil.disk_usage(d).free)} free there)"
                    + ("; nothing half-written is left" if cleaned else ""))


def remove(path):
    """Delete what is at `path` without following a symlink: a link or a file is unlinked, a real directory
    removed with its contents (shutil.rmtree unlinks the links inside, never their targets)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def fresh_dir(path):
    """An empty directory at `path`, made by one mkdir after whatever was at that name is removed (never
    followed): what is written into it cannot land outside its parent."""
    remove(path)
    os.mkdir(path)


def write_files(files):
    """Write {path: data} atomically, as a set: each data to PATH.tmp, created with O_EXCL | O_NOFOLLOW after
    whatever was at that name is removed (a planted symlink is never followed), then every temp renamed over
    its path (a reader sees the old file or the new one). data: str, bytes, or a function writing into a
    binary file. A failed write removes every temp, leaves every previous file as it was, and raises
    write_error's one line naming the path."""
    tmps, path, data = [], None, None
    try:
        for path, data in files.items():
            tmp = f"{path}.tmp"
            remove(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            tmps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                data(f) if callable(data) else f.write(data.encode() if isinstance(data, str) else data)
        for path, tmp in zip(files, tmps):
            os.replace(tmp, path)
    except BaseException as e:
        for tmp in tmps:
            remove(tmp)
        err = write_error(path, e, None if callable(data) else len(data.encode() if isinstance(data, str) else data))
        if err is None:
            raise
        raise err from None


def write_json(path, obj):
    """Write JSON atomically (write_files)."""
    write_files({path: json.dumps(obj, indent=2, default=str)})


def _json_line(obj):
    """One JSONL line as UTF-8 bytes, text as is; a lone surrogate (it has no UTF-8) is written escaped
    (\\ud800), which reads back the same."""
    try:
        return (json.dumps(obj, ensure_ascii=False, default=float) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(obj, default=float) + "\n").encode()


def append_jsonl(path, obj):
    """One os.write of one line with O_APPEND: processes append to the same file without interleaving
    (a local filesystem), and the line is in the kernel when this returns (a kill loses nothing before it)."""
    line = _json_line(obj)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as e:
        raise (write_error(path, e, len(line)) or e) from None


def write_jsonl(path, recs):
    """Write records as JSONL atomically (write_files): a reader sees the old file or the new one."""
    write_files({path: lambda f: f.writelines(_json_line(r) for r in recs)})


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
        write_files({path: "".join(keep)})


# ------------------------------------------------------------------------------------------------
# 8. HTTP: evaluate.py's --api-url generation (engine.generate_api) and the AIR-Bench judge (reward.py)

class RequestFailed(UsageError):
    """An HTTP request that failed for good (after its retries, or a 4xx that retrying cannot fix)."""


RETRY_AFTER_MAX = 60.0  # seconds: a server's Retry-After is honoured up to this


def redact(text, key):
    """`text` (str or bytes) with the API key replaced by [redacted], as sent and as a JSON body escapes it:
    a server that echoes the request (a 401 body, a proxy's error page) never puts the key into a record,
    an error or the terminal. With it goes the Authorization header, "Bearer KEY"."""
    if not key:
        return text
    for k in dict.fromkeys((key, json.dumps(key)[1:-1])):
        text = text.replace(k.encode(), b"[redacted]") if isinstance(text, bytes) else text.replace(k, "[redacted]")
    return text


def safe_url(url):
    """A URL as it may be printed or written: a password in it (http://user:PASSWORD@host) replaced."""
    import urllib.parse
    u = urllib.parse.urlsplit(url or "")
    return url if u.password is None else url.replace(f":{u.password}@", ":[redacted]@", 1)


def reply_text(x):
    """A text field of a server's reply, checked: a str that encodes as UTF-8. json.loads lets a lone
    surrogate (\\ud800) through, which the JSONL writers cannot encode; ValueError / TypeError make
    http_post treat the reply as malformed (retried, then an error record)."""
    if not isinstance(x, str):
        raise TypeError(f"a text field is a {type(x).__name__}, not a string")
    x.encode("utf-8")  # UnicodeEncodeError, a ValueError, on a lone surrogate
    return x


def _retry_after(headers):
    """Seconds a Retry-After header asks for (a number, or an HTTP date), within [0, RETRY_AFTER_MAX]; None
    when absent or unreadable."""
    import email.utils
    v = headers.get("Retry-After") if headers is not None else None
    if not v:
        return None
    try:
        s = float(v)
    except ValueError:
        try:
            s = email.utils.parsedate_to_datetime(v).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return None if s != s else min(max(s, 0.0), RETRY_AFTER_MAX)


class _Deadline:
    """A bound on one whole HTTP exchange (connect, request, status line, headers, body). urllib's timeout
    bounds each socket operation, so a reply dripped a byte at a time never times out; at `seconds` this
    timer shuts the connection's socket down, which ends the read waiting on it."""

    def __init__(self, seconds):
        self.fired, self.socks, self.lock = False, [], threading.Lock()
        self.timer = threading.Timer(seconds, self.cut)
        self.timer.daemon = True

    def watch(self, sock):
        with self.lock:
            self.socks.append(sock)
            if self.fired:
                self._shut(sock)

    def cut(self):
        with self.lock:
            self.fired = True
            for sock in self.socks:
                self._shut(sock)

    @staticmethod
    def _shut(sock):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()


class _Watched:
    """A connection (http.client's HTTP or HTTPS) that hands its socket to a _Deadline once connected."""

    def __init__(self, *a, deadline, **kw):
        super().__init__(*a, **kw)
        self.deadline = deadline

    def connect(self):
        super().connect()
        self.deadline.watch(self.sock)


class _HTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(_HTTPConnection, req, deadline=self.deadline)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, deadline=self.deadline)


def http_post(url, body, key=None, retries=5, backoff=1.0, timeout=3600, parse=None):
    """POST JSON, return parse(decoded reply) (the reply itself without parse). `timeout` bounds the whole
    exchange, the reply's last byte included (_Deadline). Retries with exponential backoff (or the
    server's Retry-After, up to RETRY_AFTER_MAX s) on connection errors and resets, timeouts, torn
    replies (a truncated body, a status line that is not HTTP), HTTP 408/409/429 and 5xx, and malformed
    replies (not JSON, or a shape `parse` rejects with KeyError/IndexError/TypeError/ValueError/
    AttributeError). Other HTTP errors (400, 401, 404) stop at once. Raises RequestFailed; the key
    never appears in what it returns or raises (redact)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data, where = json.dumps(body).encode(), safe_url(url)
    for attempt in range(retries + 1):
        wait = None
        with _Deadline(timeout) as deadline:
            opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline))
            try:
                with opener.open(urllib.request.Request(url, data, headers), timeout=timeout) as r:
                    raw = redact(r.read(), key)
                try:
                    d = json.loads(raw)
                    return parse(d) if parse else d
                except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                    why = f"malformed reply ({redact(str(e), key)[:200]}): {raw[:200]!r}"
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code not in (408, 409, 429):
                    try:
                        text = redact(e.read(1 << 16), key)[:300]  # redacted first: no piece of the key is left
                    except (OSError, http.client.HTTPException):
                        text = b""
                    raise RequestFailed(f"{where}: HTTP {e.code}: {text!r}") from None
                why, wait = f"HTTP {e.code}", _retry_after(e.headers)
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, torn replies
                why = redact(" ".join(f"{type(e).__name__}: {e}".split()), key)  # one line: BadStatusLine has \r\n
            if deadline.fired:
                why = f"timed out: no complete reply within {timeout:g} s"
        if attempt == retries:
            raise RequestFailed(f"{where}: {why} (after {retries + 1} tries)")
        time.sleep(backoff * 2 ** attempt if wait is None else max(wait, backoff * 2 ** attempt))
