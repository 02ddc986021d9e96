"""The command line: nothing here changes a number. How a stage starts (its flags and input files checked,
every problem one line naming the flag, or the file, row and field) and how it ends (one exit policy).

  cli_main      run a stage's main() with the exit policy every CLI shares: 0 done; 2 a usage or input error;
                1 a run stopped on purpose or by a full disk: one line on stderr, no traceback; the --out lock
                released and the process group finished either way
  ArgumentParser, HelpFormatter   one-line argparse errors; --help shows every default
  check_min, check_range, check_training, check_sampling, check_temperature
                flag checks, run before any model or data loads (check_training also runs preflight's checks
                of --optim, --wandb and --out)
  Logger        the step log: a short line per step on the console, every key in metrics.jsonl
"""
import argparse
import errno
import json
import math
import os
import sys

import torch

import checkpoint
import common
import preflight
from errors import StopRun, UsageError
from files import DISK_FULL, append_jsonl, write_error

DEBUG_ENV = "BEYOND_SFT_DEBUG"  # set to 1: every error shows its traceback


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
        checkpoint.release_out_dirs()
        if isinstance(e, OSError):  # a write no writer named: a full disk or a read-only filesystem is still the user's
            e = write_error(e.filename, e, cleaned=False) if e.errno in DISK_FULL + (errno.EROFS,) else None
            if e is None:
                raise
        if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, UsageError) else 1)


def finish():
    """End a torchrun process cleanly: every rank here (`barrier`), a collective barrier, then tear the process
    group down (a gloo group left to the interpreter's exit can abort the process). Also releases the
    output-dir lock."""
    checkpoint.release_out_dirs()
    if common.is_dist():
        common.barrier()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# --- flags: the parser, --help with defaults, and the checks every CLI runs before any model or data loads

class Flags(argparse.Namespace):
    """Parsed flags: vars() holds the flags alone (what args.json keeps); `defaults` the parser's default of
    each, which --resume takes for a flag the run's args.json lacks (resume.resume_changes)."""
    __slots__ = ("defaults",)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every stage's --help: "(default: X)" after each flag that has a value, unless its help says
    "(default ..." or "by default" itself."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default in (None, False) or "(default" in h or "by default" in h:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (`error: argument --x: ...`) instead of the usage block,
    whose --help is HelpFormatter's and whose flags come back as Flags."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **{"formatter_class": HelpFormatter, **kw})

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        flags = super().parse_args(args, Flags() if namespace is None else namespace)
        if isinstance(flags, Flags):
            flags.defaults = {k: self.get_default(k) for k in vars(flags)}
        return flags


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


def check_training(args, device):
    """The optimizer and run flags sft.py and rl.py share, what --optim needs on `device` (preflight.check_optimizer)
    and --wandb, and whether --out can be written."""
    check_range(args, "--lr", 0, lo_open=True)
    check_range(args, "--warmup-ratio", 0, 1)
    check_range(args, "--weight-decay", 0)
    check_range(args, "--clip", 0, lo_open=True)
    for i, b in enumerate(args.betas):
        if not 0 <= b < 1:
            raise UsageError(f"--betas: beta{i + 1} must be in [0, 1), got {b}")
    preflight.check_optimizer(args.optim, device)  # adamw8bit: CUDA and bitsandbytes
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if args.allow_changes and not args.resume:
        raise UsageError("--allow-changes goes with --resume (it lets a resumed run change its flags)")
    if args.wandb:
        preflight.import_optional("wandb", "--wandb")
    preflight.check_out_dir(args.out)


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


def dist_minutes(text):
    """argparse type of --dist-timeout: minutes, finite, in (0, 10080] (a week; timedelta overflows past ~1e12)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number of minutes, got {text!r}") from None
    if not (math.isfinite(v) and 0 < v <= 10080):
        raise argparse.ArgumentTypeError(f"must be in (0, 10080] minutes (and finite), got {text}")
    return v


def add_device_flag(a, where="where to run"):
    """--device (a: an argument group's add_argument)."""
    a("--device", default="auto", choices=["auto", "cuda", "cpu"],
      help=f"{where}: auto = CUDA when torch sees a GPU, else the CPU; auto stops with the likely cause when "
           "this machine has an NVIDIA GPU that torch cannot use; cuda stops when none is usable")


def add_compute_flags(a):
    """--device and --dist-timeout (a: an argument group's add_argument), for the stages run under torchrun."""
    add_device_flag(a)
    a("--dist-timeout", type=dist_minutes, default=common.DIST_TIMEOUT_MIN, metavar="MIN",
      help="minutes a collective may wait under torchrun before the job is stopped (the NCCL / gloo timeout); the "
           "long, uneven waits (a rank still generating, rank 0 loading the checkpoint or writing a save, another "
           "grading) wait outside any collective, without a time limit")


# The optimizer, memory and checkpoint flags sft.py and rl.py share; each stage passes its own defaults and words.

def add_optimizer_flags(p, lr, warmup_ratio, warmup_of):
    """The "optimizer" group: AdamW (or 8-bit AdamW) at peak --lr, warmup a fraction of `warmup_of`, the clip."""
    a = p.add_argument_group("optimizer").add_argument
    a("--lr", type=float, default=lr, help="peak learning rate")
    a("--warmup-ratio", type=float, default=warmup_ratio, help=f"linear warmup, fraction of {warmup_of}")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW betas")
    a("--optim", default="adamw", choices=["adamw", "adamw8bit"], help="optimizer")
    a("--clip", type=float, default=1.0, help="gradient norm clip (after the reduction)")


def add_memory_flags(a, offload_of):
    """--grad-checkpointing, --cpu-offload (of `offload_of`), --replicate, --dtype and the compute flags (a: the
    "memory" group's add_argument, after the stage's own)."""
    a("--grad-checkpointing", action="store_true", help="activation checkpointing per layer")
    a("--cpu-offload", action="store_true", help=f"FSDP2 CPU offload of {offload_of}")
    a("--replicate", type=int, default=None, help="HSDP: N replicas, each sharding over world/N ranks "
      "(default: one per node when torchrun spans nodes, else 1 = flat FSDP2)")
    a("--dtype", default=None, choices=["bf16", "fp32"], help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    add_compute_flags(a)


def add_checkpoint_flags(a, resume_free, out_holds, save_every, save_every_help):
    """--resume (its help names the flags a resumed run may change, the stage's `resume_free` among them),
    --allow-changes, --overwrite (of `out_holds`), --save-every (the stage's default and help) and
    --keep-checkpoints (a: an argument group's add_argument)."""
    free = "".join(f"{f}, " for f in resume_free)
    a("--resume", action="store_true", help="continue from the newest complete state in OUT, with the run's "
      f"flags (args.json); only --stop-at, --save-every, --keep-checkpoints, {free}--wandb, --trust-remote-code, "
      "--dist-timeout and a --device that resolves to the same device may change; a flag newer than the run's "
      "args.json takes its default")
    a("--allow-changes", action="store_true", help="with --resume: continue with changed flags (args.json keeps "
      "the run's and records each change with the step it took effect after)")
    a("--overwrite", action="store_true", help=f"replace a previous run in OUT (its {out_holds})")
    a("--save-every", type=int, default=save_every, help=save_every_help)
    a("--keep-checkpoints", type=int, default=3, help="newest OUT/checkpoints/step-N kept (0: all)")


# apply_chat_template's own arguments: a template variable of the same name would be swallowed by them
_RESERVED_CHAT_KWARGS = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                         "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                         "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


def chat_template_kwargs(text):
    """argparse type of --chat-template-kwargs: a JSON object -> dict (argparse names the flag on error)."""
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


# --- the step log ------------------------------------------------------------------------------------

class Logger:
    """Rank 0's step log: one line per step on the console with the keys in `show` (all when None), every key
    in OUT/metrics.jsonl (and wandb when asked)."""

    def __init__(self, out, total_steps, wandb_project=None, args=None, show=None):
        self.out, self.total, self.show, self.wandb = out, total_steps, show, None
        if common.rank() == 0 and wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, config=args)

    def log(self, step, metrics):
        if common.rank() != 0:
            return
        rec = {"step": step, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                               for k, v in metrics.items()}}
        line = " | ".join(f"{k} {_fmt(v)}" for k, v in rec.items()
                          if k != "step" and (self.show is None or k in self.show))
        print(f"step {step}/{self.total} | {line}", flush=True)
        append_jsonl(os.path.join(self.out, "metrics.jsonl"), rec)
        if self.wandb is not None:
            self.wandb.log(rec, step=step)


def _fmt(v):
    """A logged value on the console: 4 significant digits."""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)
