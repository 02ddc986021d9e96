"""The command line: nothing here changes a number. How a stage starts (its flags and input files checked,
every problem one line naming the flag, or the file, row and field) and how it ends (one exit policy).

  cli_main      run a stage's main() with the exit policy every CLI shares: 0 done; 2 a usage or input error;
                1 a run stopped on purpose or by a full disk: one line on stderr, no traceback; the --out lock
                released and the process group finished either way
  ArgumentParser, HelpFormatter   one-line argparse errors; --help shows every default
  check_min, check_range, check_training, check_sampling, check_temperature, check_out_dir, ...
                flag checks, run before any model or data loads
  read_table, load_pairs, read_generations   input tables (local .jsonl/.json/.csv/.parquet or a hub dataset)
                and generation records, every row checked before any model loads
  check_model   a model dir, before any weight is read
  Logger        the step log: a short line per step on the console, every key in metrics.jsonl
"""
import argparse
import csv
import errno
import io
import json
import math
import os
import sys

import torch

import checkpoint
import common
from common import DataError, StopRun, UsageError
from files import DISK_FULL, append_jsonl, read_jsonl, read_text, write_error

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

class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (`error: argument --x: ...`) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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
    a("--dist-timeout", type=dist_minutes, default=common.DIST_TIMEOUT_MIN, metavar="MIN",
      help="minutes a collective may wait under torchrun before the job is stopped (the NCCL / gloo timeout); the "
           "long, uneven waits (a rank still generating, rank 0 loading the checkpoint or writing a save, another "
           "grading) wait outside any collective, without a time limit")


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


# --- input tables: errors name the file, the row and the field (docs/design.md §2) ------------------


# Known schemas, by columns: (prompt column candidates, response/gold column candidates)
PROMPT_FIELDS = ["question", "problem", "prompt", "input", "Question", "instruction"]
RESPONSE_FIELDS = ["response", "completion", "output", "answer"]


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
                raise DataError(f"{spec}: not a readable parquet file ({common.first_line(e)})") from None
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


def load_pairs(spec, prompt_field=None, response_field=None, need_response=True, split="train", rows=None):
    """(prompt, response) rows for SFT / RL prompts, validated before any training starts: those of `rows`
    when given (spec's table, already read), else read_table(spec). Returns dicts with prompt, [response],
    id, row (1-based). Errors name file, row and field."""
    rows = read_table(spec, split) if rows is None else rows
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


# --- model dirs, checked before any weight is read -----------------------------------------------------

HEADS = {"causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "a causal language model (AutoModelForCausalLM)"),
         "seq-cls": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                     "a sequence classifier (AutoModelForSequenceClassification)")}


def read_config(path, what="--model"):
    """config.json of a local dir or a hub id, as a plain dict (no config class is built, so an unknown
    model_type can be named)."""
    from transformers import PretrainedConfig
    p = common.check_path(path, what)
    try:
        return PretrainedConfig.get_config_dict(p)[0]
    except (OSError, ValueError) as e:
        raise UsageError(f"{what} {path}: cannot read its config.json ({common.first_line(e)})") from None


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
        common.check_tokenizer_files(p, what, path)
        for f in _safetensors_files(p, what, path):
            _check_safetensors(os.path.join(p, f), what, path)
    return cfg


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
