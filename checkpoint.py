"""Checkpoints: nothing here changes a number. What a training run leaves in --out, and how a run continues
from it exactly where it stopped (docs/design.md §2, "Checkpoints", is the contract).

  save_hf       the Hugging Face export in OUT (from_pretrained / vLLM load it as is) and OUT/checkpoints/step-N,
                swapped in as a whole; refuses non-finite weights before anything is written
  save_state    sharded model + optimizer (torch.distributed.checkpoint), scheduler, RNG and step into OUT/state,
                atomically (state.tmp, a COMPLETE marker last, two renames)
  load_state    --resume: the newest complete state, read without running code from it (safeload); metrics.jsonl,
                rollouts/ and checkpoints/ cut back to its step
  save_step     after a step, every --save-every steps and at the last: save_hf, then save_state
  restore       the step a run starts at (load_state under --resume), args.json written
  claim_out_dir the --out lock for the run's life; a new run refuses a dir holding another run
  check_finite, check_finite_weights   nothing non-finite is stepped into or written

Every write goes through files.py (a temp beside its target, renamed when complete) and, under torchrun,
through write_on_every_rank, so a full disk on one rank stops every rank with the previous save intact.
What a resume may reuse (the run's flags, evaluate.py's records) is resume.py's.
"""
import io
import json
import math
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import preflight
import resume
import safeload
from common import Policy, all_reduce, barrier, broadcast_object, comm_device, gather_objects, is_dist, print0, rank
from errors import DiskFull, NonFiniteError, UsageError
from files import fresh_dir, open_no_follow, remove, write_error, write_files, write_json


# --- the Hugging Face export ---------------------------------------------------------------------------

def _full_state_dict(model):
    """The full (unsharded) state dict on rank 0's CPU. Collective under torchrun."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    hf = model.hf if isinstance(model, Policy) else model
    if is_dist():
        return get_model_state_dict(hf, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in hf.state_dict().items()}


def _link_or_copy(src, dst):
    """Hard link (files are only ever replaced, never edited in place); copy if the filesystem refuses."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


HF_WEIGHT_PREFIXES = ("model.safetensors", "model-0", "pytorch_model")
# what an export copies from the input checkpoint: the files a tokenizer loads from, and its config and template
TOKENIZER_EXPORT_FILES = preflight.TOKENIZER_FILES + ("tokenizer_config.json", "special_tokens_map.json",
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
    """Roll a complete export in OUT/.export.ready (made by one rename once complete) into OUT, replacing the
    previous one as a whole: its files move in, and weight and tokenizer files of the previous export that
    the new one lacks go (a changed shard count; a chat_template.jinja that would override the copied
    tokenizer_config's). A run killed during the moves is finished by the next start on OUT (claim_out_dir),
    so OUT never keeps weights of two different steps."""
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
    """Gather the full state dict to rank 0 and write a from_pretrained-loadable dir into `out` (config,
    safetensors, the input's tokenizer files (save_tokenizer), generation_config), swapped in as a whole
    (install_export). With `checkpoint`, the same files also become OUT/checkpoints/step-N/ (N = `step`; hard
    links, no optimizer state), keeping the newest `keep` (0 keeps all). Refuses non-finite weights before
    anything is written; a failed write (a full disk) removes the half export and stops every rank: the
    previous export stays. Collective: every rank must call it."""
    check_finite_weights(model, step)
    hf = model.hf if isinstance(model, Policy) else model
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


def _lock(out):
    """OUT/.lock opened without following a link (a planted one is refused, naming it), its flock taken and
    this process's pid written into it; a lock another run holds is refused, naming that run's pid."""
    import fcntl
    path = os.path.join(out, ".lock")
    f = os.fdopen(open_no_follow(path, os.O_RDWR | os.O_CREAT, f"--out {out}: {path} is a symbolic link; "
                                 "remove it (the lock is never taken through a link)"), "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip() or "?"
        f.close()
        raise UsageError(f"--out {out} is in use by another run (pid {holder}); wait for it to finish "
                         f"or pick another --out") from None
    f.seek(0), f.truncate(), f.write(f"{os.getpid()}\n"), f.flush()
    return f


def claim_out_dir(out, resume=False, overwrite=False):
    """Make this run the owner of OUT: an exclusive fcntl.flock on OUT/.lock held until the process
    ends (rank 0 holds it under torchrun). Without --resume a dir holding a previous run's state or
    metrics is refused unless --overwrite, which deletes those (state*, metrics.jsonl, checkpoints/,
    rollouts/) first. Also finishes an export install a killed run left half done. Collective."""
    msg = None
    if rank() == 0:
        key = os.path.realpath(out)
        try:
            os.makedirs(out, exist_ok=True)
            if key not in _HELD:
                _HELD[key] = _lock(out)
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
    msg = broadcast_object(msg)
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
    """Sharded model + optimizer (torch.distributed.checkpoint) and per-rank extra state (step, which fixes the
    data position; scheduler; RNG) into out/state, atomically: write state.tmp, the COMPLETE marker last, then
    rename (state -> state.old, state.tmp -> state, drop state.old). A kill at any point leaves at least one
    complete state dir; load_state picks the newest. A failed write (a full disk) removes state.tmp and stops
    every rank (write_on_every_rank): the previous state stays. Called after save_hf (finite weights)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    out = Path(out)
    tmp, final, old = out / "state.tmp", out / "state", out / "state.old"
    write_on_every_rank((lambda: fresh_dir(tmp)) if rank() == 0 else None, (tmp,))  # never a planted link
    msd, osd = get_state_dict(model, optim)

    def write():  # every rank: its shards and its extra state
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        buf = io.BytesIO()  # written by write_files: a full disk is an OSError naming the file
        torch.save({"step": step, "sched": sched.state_dict(), "rng": resume.rng_state()}, buf)
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


def save_step(args, model, tok, optim, sched, export_dtype, step, stop):
    """After `step`: every --save-every steps (0: never) and at the run's last step `stop`, the export (and
    OUT/checkpoints/step-N when periodic), then the state, in that order (docs/design.md §2, "Checkpoints")."""
    periodic = bool(args.save_every) and step % args.save_every == 0
    if periodic or step == stop:
        save_hf(model, tok, args.out, export_dtype, step, checkpoint=periodic, keep=args.keep_checkpoints)
        save_state(args.out, model, optim, sched, step)


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


def load_state(out, model, optim, sched):
    """--resume: restore the newest complete state among state/, state.old, state.tmp (model,
    optimizer, scheduler, RNG), cut metrics.jsonl, rollouts/ and checkpoints/ back to its step, and
    return that step. Nothing in the state can run code: the extra state is read with
    torch.load(weights_only=True), the sharded state through safeload.dcp_load."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    world = dist.get_world_size() if is_dist() else 1
    msg, found = None, []
    try:
        found = _complete_states(out, world)
    except UsageError as e:
        msg = str(e)
    msg, found = broadcast_object((msg, found))  # every rank must agree before any collective load
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
    safeload.dcp_load(sd, path)
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    try:  # weights_only: tensors and plain containers only; a pickled object that would run code is refused
        extra = torch.load(path / f"extra_rank{rank()}.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f"--resume: {path / f'extra_rank{rank()}.pt'} holds more than tensors and plain data, "
                         f"refused (read with weights_only=True): {safeload.load_error(e)}") from None
    resume.set_rng_state(extra["rng"])
    sched.load_state_dict(extra["sched"])
    resume.cut_back(out, extra["step"])  # rank 0: metrics.jsonl, rollouts/, checkpoints/
    barrier()
    print0(f"resumed from {path} at step {extra['step']}")
    return extra["step"]


def restore(args, model, optim, sched, changes):
    """The step a run starts at: 0, or with --resume load_state's, the restored optimizer and scheduler given
    the new values of --allow-changes (resume.apply_optimizer_flags); then rank 0 writes OUT/args.json
    (resume.write_args: a resume records its `changes` there)."""
    step = load_state(args.out, model, optim, sched) if args.resume else 0
    if args.allow_changes and changes:  # the restored optimizer and scheduler still hold the run's values
        resume.apply_optimizer_flags(optim, sched, args.lr, args.betas, args.weight_decay)
    if rank() == 0:
        resume.write_args(args, step, changes)
    return step
