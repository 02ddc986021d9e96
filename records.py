"""Generation records (docs/design.md §2), written and read: nothing here changes a number. evaluate.py's
OUT/NAME.jsonl grows a record at a time; a rerun of the same command reuses what is on disk when its
fingerprint (OUT/run.json) matches, retries what failed, and grades again what another grading scored.
rl.py dumps its rollouts as records; entropy.py reads record files back to score them again, each checked
before any model loads.

  key               a record's job: (benchmark, id, sample)
  fingerprint       what makes a record reusable: sampling settings, the model's files, the data, the rendering
  read_records, extras, run_meta   OUT/NAME.jsonl as {key: record}; records of jobs not asked for; OUT/run.json
  resume_records    rank 0 checks and compacts the files, every rank gets the jobs already done
  parse_named       entropy.py's --model / --input NAME=PATH flags
  read_for_scoring  one record file, row-numbered, and the temperature its records were sampled at
  check_prompt_ids  a record's prompt_ids are tokens of the model that scores it
  dump_rollouts     rl.py's rollouts of a step as generation records
"""
import hashlib
import json
import math
import os

import benchmarks
import cli
import common
import files
import resume
import tables
from errors import DataError, UsageError


def key(r):
    """A record's job."""
    return r["benchmark"], str(r["id"]), int(r["sample"])


def fingerprint(args, tok, rows, jobs, names):
    """What makes a record on disk reusable by this command, per benchmark: the sampling settings; the
    model, by name and by the content of its files (model_sha256); the benchmark's data, by the sha256 of
    every parsed row (before --limit, so a larger --limit reuses what a smaller one made); the rendering,
    by the chat template, --chat-template-kwargs and the sha256 of the token ids the benchmark's first
    prompt is sent as (anything else that changes prompt ids, the tokenizer included). Returns (per
    benchmark fingerprint, the model files' hash cache for run.json)."""
    model_hash, model_files = resume.model_sha256(args.model, run_meta(args.out).get("model_files"))
    sha = lambda x: hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()  # noqa: E731
    common_fp = {"model": args.model, "model_sha256": model_hash, "api_url": bool(args.api_url),
                 "api_model": args.api_model, "temperature": args.temperature, "top_p": args.top_p,
                 "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                 "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest(),
                 "chat_template_kwargs": args.chat_template_kwargs}
    first = {n: next(j for j in jobs if j["benchmark"] == n) for n in names}
    ids = {n: common.render_prompt(tok, first[n]["prompt"], args.chat_template_kwargs) for n in names}  # as sent
    return {n: {**common_fp, "data": args.data.get(n, benchmarks.BENCHMARKS[n][0]), "data_sha256": sha(rows[n]),
                "prompt_sha256": sha(ids[n])} for n in names}, model_files


CHANGED = {"model_sha256": "the files of {model} changed (retrained or replaced at the same path?)",
           "data_sha256": "the rows of {data} changed", "chat_template_sha256": "the chat template changed",
           "prompt_sha256": "the prompt token ids changed (chat template, its kwargs or the tokenizer)"}


def _changed(k, old, fp):
    """One difference between a benchmark's recorded fingerprint and this command's `fp`, in words."""
    if k in CHANGED:
        return f"{k} (not recorded with those records)" if old is None else CHANGED[k].format(**fp)
    return f"{k} {json.dumps(old)[:80]} -> {json.dumps(fp[k])[:80]}"


def read_records(out, names):
    """{(benchmark, id, sample): record} of OUT/NAME.jsonl for every name (resume.read_records: a torn
    last line is dropped with a warning; a later record of the same job replaces an earlier one)."""
    return {k: r for n in names for k, r in resume.read_records(os.path.join(out, f"{n}.jsonl"), key).items()}


def extras(out, name, order):
    """Records in OUT/NAME.jsonl of jobs this command does not have (an earlier, larger --limit): kept."""
    recs = read_records(out, [name])
    return [r for k, r in sorted(recs.items()) if k not in order]


def run_meta(out):
    """OUT/run.json: per benchmark the fingerprint its records were made with, and the model files' hashes."""
    path = os.path.join(out, "run.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def resume_records(args, names, fp, model_files, rank, graded_by):
    """Rank 0: check that the records in --out were made with these settings (fingerprint; else
    --overwrite), drop torn lines and failed (`error`) records so they are retried, unscore the records of a
    benchmark whose grading changed (graded_by: grading()), rewrite the files compacted, record the
    fingerprint, the grading (and the model files' hash cache) in OUT/run.json. Every rank then gets the set
    of jobs already done."""
    msg = None
    if rank == 0:
        meta_path, meta = os.path.join(args.out, "run.json"), run_meta(args.out)
        for n in names:
            path = os.path.join(args.out, f"{n}.jsonl")
            if os.path.exists(path) and args.overwrite:
                os.remove(path)
            elif os.path.exists(path) and meta.get(n) != fp[n]:
                was = meta.get(n) or {}
                diff = [_changed(k, was.get(k), fp[n]) for k, v in fp[n].items() if was.get(k) != v]
                msg = (f"--out {args.out}: {n}.jsonl holds records made with other settings: {'; '.join(diff)}; "
                       f"use another --out, or --overwrite to discard them")
                break
        if msg is None:
            recs = read_records(args.out, names)
            for r in recs.values():  # a failed judge call: keep the generation, grade it again
                if str(r.get("error", "")).startswith("judge:"):
                    r.pop("error"), r.update(score=None)
            was = meta.get("grading", {})
            for n in [n for n in names if was.get(n) != graded_by[n] and any(k[0] == n for k in recs)]:
                print(f"evaluate: {n}.jsonl was graded by {json.dumps(was.get(n))}, now {json.dumps(graded_by[n])}: "
                      f"its records are graded again", flush=True)
                for r in (r for k, r in recs.items() if k[0] == n):
                    r["score"] = None
            for n in names:
                keep = [r for k, r in recs.items() if k[0] == n and not r.get("error")]
                if os.path.exists(os.path.join(args.out, f"{n}.jsonl")):
                    files.write_jsonl(os.path.join(args.out, f"{n}.jsonl"), keep)
            files.write_json(meta_path, {**meta, **fp, "grading": {**was, **graded_by}, "model_files": model_files})
    common.barrier()  # rank 0 hashed the model files and rewrote the records: the others wait here, not in a collective
    msg = common.broadcast_object(msg)
    if msg:
        raise UsageError(msg)
    common.barrier()
    return set(read_records(args.out, names))


# --- record files read back to score again (entropy.py) ----------------------------------------------

def parse_named(specs, flag):
    """["name=path" | "path"] -> [(name, path)]; a bare path is allowed only when it is the only one."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or os.sep in name:
            if len(specs) > 1:
                raise UsageError(f"{flag} {spec!r}: give every {flag} a name when there are several "
                                 f"({flag} NAME=PATH)")
            name, path = os.path.splitext(os.path.basename(spec.rstrip("/")))[0], spec
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UsageError(f"{flag}: duplicate names {names}")
    return out


def read_for_scoring(path, temperature):
    """(records, temperature) of one record file, checked field by field, each record given its 1-based `row`.
    The temperature to score them at is `temperature` (--temperature) when given, else the one every record
    says it was sampled at (one finite value > 0; a record without one is refused, never assumed)."""
    recs = tables.read_generations(path, need=("prompt", "completion"))
    for row, r in enumerate(recs, 1):
        r["row"] = row
    if temperature is None:
        for r in recs:
            t = r.get("temperature")
            if t is None:
                raise DataError(f"{path}: row {r['row']}: no field 'temperature' (the sampling temperature the "
                                f"entropy is taken at); pass --temperature")
            if not (type(t) in (int, float) and math.isfinite(t)):
                raise DataError(f"{path}: row {r['row']}: field 'temperature' is not a finite number: {t!r}")
        temps = {r["temperature"] for r in recs}
        if len(temps) > 1:
            raise DataError(f"{path}: records have several temperatures {sorted(temps)}; pass --temperature")
        temperature = float(temps.pop())
        if temperature <= 0:
            raise DataError(f"{path}: temperature {temperature} <= 0 (entropy needs a sampling temperature)")
        try:
            cli.check_temperature(temperature, f"{path}: the records' temperature")
        except UsageError as e:
            raise DataError(f"{e}; pass --temperature") from None
    return recs, temperature


def check_prompt_ids(path, recs, tok, mname):
    """A record's prompt_ids must be this model's tokens: inside its vocabulary, and decoding to a text that
    holds the record's prompt, its outer whitespace aside (a template that trims the user's content, as
    Llama-3.1's, renders " x \n" as "x"; ids of another tokenizer would be scored as garbage)."""
    for r in recs:
        ids = r.get("prompt_ids")
        if ids is not None and (max(ids) >= len(tok) or r["prompt"].strip() not in tok.decode(ids)):
            raise DataError(f"{path}: row {r['row']}: field 'prompt_ids' are not tokens of --model {mname}'s "
                            f"tokenizer (they do not decode to a text holding the record's prompt)")


# --- rl.py's rollout dumps -------------------------------------------------------------------------

def dump_rollouts(step, items, R, args, rank):
    """rl.py's rollouts of `step` as generation records, gathered to rank 0 and written to
    OUT/rollouts/step_N.jsonl (rl.py makes OUT/rollouts at its start), with the temperature and top-p they were
    sampled at (entropy.py scores a record at its own temperature). Collective: every rank must call it."""
    recs, n = [], args.samples_per_prompt
    for i, it in enumerate(items):
        reasoning, answer, closed = common.split_reasoning(it["completion"], it["thinking"])
        recs.append({"benchmark": "rl", "id": it["id"], "sample": i % n, "prompt": it["prompt"],
                     "completion": it["completion"], "thinking": it["thinking"], "reasoning": reasoning,
                     "answer": answer, "think_closed": closed, "truncated": it["truncated"],
                     "num_tokens": it["n_tokens"], "gold": it["gold"], "score": float(R[i]), "step": step,
                     "rank": rank, "prompt_ids": it["prompt_ids"], "temperature": args.temperature,
                     "top_p": args.top_p})
    recs = common.gather_objects(recs)
    if rank == 0:  # written whole (temp file + rename): a replayed step after --resume rewrites it, never appends
        files.write_jsonl(os.path.join(args.out, "rollouts", f"step_{step:05d}.jsonl"), recs)
