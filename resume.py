"""What a run may reuse from its --out: nothing here changes a number. A training run's --resume keeps the
run's flags (OUT/args.json); evaluate.py reuses the records in OUT/NAME.jsonl while the model's files are
the same.

  resume_changes, write_args   --resume compares this start's flags with the run's; --allow-changes records a
                               change in args.json, apply_optimizer_flags applies it to the restored optimizer
  cut_back                     metrics.jsonl, rollouts/ and checkpoints/ cut back to the restored step
  read_records                 an append-only record file (OUT/NAME.jsonl) back as {key: record}
  model_sha256                 a model dir's files by content, with a stat cache (evaluate.py's fingerprint)
  rng_state, set_rng_state     the Python and torch generators a state saves and --resume restores
"""
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch

import common
from errors import DataError, UsageError
from files import read_jsonl, write_json, write_jsonl


# --- --resume keeps the run's flags ---------------------------------------------------------------------

# Flags that change no number of a run: where it stops, how often it saves, dumps and logs, what it may
# load, how long a collective may wait. Every other flag (model, data, optimizer, schedule, batch and sampling
# settings, estimator, seed, dtype, memory layout) can change what the steps compute, so --resume compares it
# with the run's args.json; --device is free when it resolves to the same device (same_device).
RESUME_FREE = ("stop_at", "save_every", "keep_checkpoints", "dump_every", "wandb", "max_kl", "reflection_words",
               "trust_remote_code", "dist_timeout")
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


def _as_json(flags):
    """Flags as args.json holds them (tuples as lists, anything else as its str)."""
    return json.loads(json.dumps(flags, default=str))


def same_device(old, new):
    """--device: two values that resolve to the same device on this machine (auto and cuda on a GPU machine)."""
    try:
        return common.resolve_device(old) == common.resolve_device(new)
    except UsageError:  # the run's value cannot run here: a change the user must allow
        return False


def resume_changes(args):
    """--resume: the flags of this start that differ from the run's ({dest: [the run's value, the new one]}),
    checked before any model loads. A flag the run's args.json lacks (written before the flag existed) has
    its parser default there (args.defaults: cli.Flags). Refuses (UsageError naming each flag and both
    values) a change of a flag outside RESUME_FREE unless --allow-changes; then write_args records it. Every
    rank reads the same args.json and so takes the same branch."""
    _, flags = run_flags(args.out)
    if flags is None:  # no args.json: the run never got past its start, load_state finds no state
        return {}
    flags = {**_as_json(getattr(args, "defaults", None) or {}), **flags}
    new = _as_json(vars(args))
    changes = {k: [flags.get(k), v] for k, v in new.items() if k not in _NOT_RUN_FLAGS and flags.get(k) != v}
    fixed = {k: ch for k, ch in changes.items() if k not in RESUME_FREE
             and not (k == "device" and same_device(*ch))}
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


def cut_back(out, step):
    """On resume (rank 0), drop what lies past the restored step (it will be written again): metrics.jsonl
    lines, rollouts/step_N.jsonl and checkpoints/step-N. A torn last metrics line (a kill mid-write) is dropped
    with a warning, a bad line elsewhere is a DataError (files.read_jsonl)."""
    if common.rank() != 0:
        return
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        recs = read_jsonl(path, appended=True)
        for i, rec in enumerate(recs, 1):
            if not isinstance(rec.get("step"), int):
                raise DataError(f"{path}: record {i}: not a metrics record (no integer 'step')")
        write_jsonl(path, [rec for rec in recs if rec["step"] <= step])
    for f in (Path(out) / "rollouts").glob("step_*.jsonl"):
        if f.stem[5:].isdigit() and int(f.stem[5:]) > step:
            f.unlink()
    for d in (Path(out) / "checkpoints").glob("step-*"):
        if d.name[5:].isdigit() and int(d.name[5:]) > step:
            shutil.rmtree(d)


# --- append-only record files: evaluate.py's OUT/NAME.jsonl grows a record at a time ------------------

def read_records(path, key):
    """{key(record): record} of an append-only JSONL file (files.read_jsonl's rule: a torn last line is
    dropped with a warning); a later record of the same key replaces an earlier one (a job redone after a
    failure); {} when there is no file. A row key() cannot read is a DataError naming the file and row."""
    recs = {}
    if os.path.exists(path):
        for i, r in enumerate(read_jsonl(path, appended=True), 1):
            try:
                recs[key(r)] = r
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{path}: record {i}: not a generation record (no benchmark, id and sample)") from None
    return recs


# --- the files of a model dir, by content (evaluate.py's fingerprint) -------------------------------------

# The files of a model dir that decide what it generates (from_pretrained reads them): weights, config,
# generation config (stop ids), tokenizer and chat template, remote code. Not a training run's args.json,
# metrics.jsonl or state/, nor what evaluate.py writes when --out is the model dir.
MODEL_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
               "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json")
MODEL_FILE_ENDS = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".model", ".tiktoken", ".py")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def model_sha256(path, cache):
    """sha256 over the MODEL_FILES of a local model dir, each by its content: a model retrained or replaced
    at the same path gets another hash, a copy of the same model the same one. Hashing reads every byte
    (~1.3 GB/s), so a file whose (size, mtime, inode) equal those in `cache` (kept in OUT/run.json by the
    last run on OUT) reuses the hash recorded there; any other file is read again. Returns (hash, cache
    for run.json); (None, None) for a hub id, which the fingerprint names instead."""
    if not os.path.isdir(path):
        return None, None
    real, files, h = os.path.realpath(path), {}, hashlib.sha256()
    old = cache["files"] if (cache or {}).get("dir") == real else {}
    for name in sorted(os.listdir(path)):
        f = os.path.join(path, name)
        if not (name in MODEL_FILES or name.startswith("tokenizer") or name.endswith(MODEL_FILE_ENDS)) \
                or not os.path.isfile(f):
            continue
        st = os.stat(f)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        sha = old[name][3] if old.get(name, [])[:3] == stamp else file_sha256(f)
        files[name] = [*stamp, sha]
        h.update(f"{name}\0{sha}\n".encode())
    return h.hexdigest(), {"dir": real, "files": files}


# --- the random generators: saved with the state, restored by --resume ----------------------------------

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
