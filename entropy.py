"""Token analysis: entropy at reflection tokens, reflection counts, and memorization of SFT data.

The paper (arXiv 2512.01848) explains why RL beats SFT with the entropy of the next-token distribution at
reflection tokens ("wait", "but", "alternatively"): RL lowers it on unsafe prompts (AttaQ 0.24 -> 0.09) and
keeps it on reasoning prompts (AIME24 3.12 -> 3.00). This script recomputes it for any checkpoints on saved
generation records (evaluate.py output, docs/design.md §2); docs/design.md §3 (entropy analysis) says why the
definitions below are these.

Math. Each record is scored teacher-forced: ids = prompt_ids ++ tokenize(completion), one forward, where
prompt_ids are the token ids the sample was generated from, stored in the record (records without them,
written by older code, are rendered again: common.render_prompt with --chat-template-kwargs). Completion
token t was produced by the logits z_{t-1} of the position before it, so at the sampling temperature tau
(--temperature; default the records' own `temperature`, which every record must then carry):

    p_t = softmax(z_{t-1} / tau)                over the full vocabulary
    H_t = -sum_v p_t(v) log p_t(v)              (nats; common.head_logprobs, fp32 accumulation,
                                                 logits formed one chunk of positions at a time)

"Entropy at a reflection token" is H_t of the distribution that PRODUCED the reflection token; "after" is
H of the first token after the reflection word (in token mode: the next token). Per (model, dataset), every
entropy is the token-pooled mean  sum_records sum_t H_t / sum_records n_t  over the tokens of that kind, and
reflections_per_1k = 1000 * n_reflections / n_reasoning_tokens. 95% intervals: percentile bootstrap over
records (the independent units; each resample recomputes the pooled ratio).

Definitions.
  reasoning tokens  completion tokens before the LAST "</think>" (minus a leading "<think>"); all of the
                    completion when the thinking never closed. Answer tokens: after "</think>". A record
                    whose `thinking` is false and whose completion opens no think block has answer tokens
                    only (common.split_reasoning).
  reflection token  --match word (default): a whole-word occurrence of a --words entry (default
                    wait,Wait,but,But,Alternatively) in the reasoning text, also when the tokenizer split it,
                    placed at the token holding its first letter. --match token: a reasoning token whose
                    decoded text, leading whitespace stripped, is one of --words (misses split words).
  memorization      --memorization DATA (STAR-1 question/response rows), per model and row, the response
                    rendered exactly as sft.py trains it (common.render_sft; --answer-only as sft.py's):
                    loglik       mean over response tokens of log p(y_t | y_<t, prompt) at temperature 1;
                    greedy_match 1 if, given the prompt and the first k response tokens, the next m
                                 greedy tokens equal the reference exactly (rows shorter than k+m skipped):
                                 all m teacher-forced argmaxes at positions k..k+m-1 equal the reference;
                    token_acc    the teacher-forced argmax accuracy in that window (not a greedy quantity).

Deviations / notes.
  1. The completion text is re-tokenized (the records store its text; the prompt's ids are stored); for a
     canonical BPE this reproduces the sampled ids except for rare non-canonical samples.
  2. Logits are computed in the model dtype (bf16 on GPU), like the sampler's, one chunk of positions at
     a time (the argmax for memorization needs them), never a float32 [tokens, vocab] tensor.
  3. The paper gives no formula for memorization; the two definitions above are ours.

Outputs in --out: records.jsonl (one line per record and model), summary.json (one object per
(model, dataset)), hist.json, entropy_reflection.png, entropy_hist.png, and with --memorization
memorization.json + memorization.jsonl. A table is printed.

  python entropy.py --model base=DIR --model rl=DIR --input attaq=gens/attaq.jsonl \\
      --input aime24=gens/aime24.jsonl --out runs/entropy
  torchrun --nproc_per_node 8 entropy.py --model sft=DIR --model rl=DIR --input attaq=FILE \\
      --memorization data/star1.json --out runs/entropy     # records are sharded across ranks
"""
import argparse
import bisect
import itertools
import json
import math
import os
import re

import numpy as np
import torch
from tqdm import tqdm

import cli
import common
import files
import preflight
import records
import tables
from errors import DataError, UsageError

DEFAULT_WORDS = "wait,Wait,but,But,Alternatively"
HIST_BINS = 60
MAX_BOOTSTRAP = 100_000  # resamples: far past where a 95% interval's percentiles stop moving


# --- reflection detection: one word match, two kinds of token spans -----------------------------------
#
# find_reflections matches words on the text; the spans say which token holds each match. entropy.py scores
# saved TEXT, tokenized again: the spans are the tokenizer's offset_mapping (score_record). rl.py's monitor has
# the SAMPLED ids: the spans are their decoded pieces laid end to end (reflection_mask). The two agree token
# for token unless tokenizing the text again does not give the sampled ids back (a non-canonical sample, rare).

def segment_masks(text, offsets, thinking=True):
    """Reasoning / answer membership of each token, from its (start, end) char span in `text` and the
    spans of common.split_reasoning (every family's format; `thinking` the record's)."""
    (r0, r1), (a0, a1), _ = common.reasoning_spans(text, thinking)
    reasoning = [s >= r0 and e > s and e <= r1 for s, e in offsets]
    answer = [s >= a0 and e > s and e <= a1 for s, e in offsets]
    return reasoning, answer


def find_reflections(text, offsets, reasoning, words, match="word"):
    """Reflection tokens inside the reasoning: a list of (token index, index of the next token or None,
    word). `offsets[i]` is token i's char span in `text`; `reasoning[i]` its reasoning-segment flag."""
    n, out = len(offsets), []
    if match == "token":
        for i, (s, e) in enumerate(offsets):
            w = text[s:e].lstrip()
            if reasoning[i] and w in words:
                out.append((i, i + 1 if i + 1 < n else None, w))
        return out
    # word mode: whole-word occurrences in the text (a "letter" is any unicode letter)
    pat = re.compile(r"(?<![^\W\d_])(" + "|".join(map(re.escape, sorted(words, key=len, reverse=True)))
                     + r")(?![^\W\d_])")
    starts = [s for s, _ in offsets]  # non-decreasing
    for m in pat.finditer(text):
        first = bisect.bisect_right(starts, m.start()) - 1  # the token holding the first letter
        if first < 0 or not reasoning[first]:
            continue
        nxt = bisect.bisect_left(starts, m.end(), lo=first + 1)
        out.append((first, nxt if nxt < n else None, m.group(1)))
    return out


def reflection_mask(items, words, T, piece):
    """rl.py's per-step monitor: (B, T) True at each completion token holding the first letter of a reflection
    word (whole word) in its reasoning, from the SAMPLED ids: piece(id) is one id's text (tok.decode([id]), cached)
    and a completion's text is their concatenation, which gives each token its exact span (a character split
    across byte-level tokens reads as U+FFFD, never a letter); then find_reflections' word matching."""
    hit = torch.zeros(len(items), T, dtype=torch.bool)
    for b, it in enumerate(items):
        texts = [piece(i) for i in it["completion_ids"]]
        ends = list(itertools.accumulate(len(x) for x in texts))
        offsets = [(e - len(x), e) for x, e in zip(texts, ends)]
        text = "".join(texts)
        reasoning, _ = segment_masks(text, offsets, it["thinking"])
        for i, _, _ in find_reflections(text, offsets, reasoning, words, "word"):
            hit[b, i] = True
    return hit


# --- 1-2. scoring: teacher-forced, each rank its shard of the records ---------------------------------

@torch.no_grad()
def token_stats(model, seqs, starts, temperature=1.0, chunk_tokens=1024, pad_id=0):
    """Teacher-forced (logp, ent, argmax) of tokens seqs[i][starts[i]:], each from the logits of the
    position before it, at `temperature`, over the full vocabulary. Returns one tuple per sequence."""
    dev = next(model.parameters()).device
    ids, mask = common.pad_right(seqs, pad_id, device=dev)                            # (B, T) each
    mask = mask.long()
    pos = common.positions_from_mask(mask)                                            # (B, T)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                              use_cache=False).last_hidden_state                      # (B, T, D)
    rows = torch.cat([torch.full((len(s) - st,), i) for i, (s, st) in enumerate(zip(seqs, starts))]).to(dev)
    cols = torch.cat([torch.arange(st - 1, len(s) - 1) for s, st in zip(seqs, starts)]).to(dev)
    h, tgt = hidden[rows, cols], ids[rows, cols + 1]                                  # (N, D), (N,)
    # the training stages' head (logits_scaling, soft cap), logits one chunk at a time for the argmax
    logp, ent, am = common.head_logprobs(model, h, tgt, temperature, chunk_tokens, argmax=True)  # (N,) each
    split = [len(s) - st for s, st in zip(seqs, starts)]
    return list(zip(*(x.cpu().split(split) for x in (logp, ent, am))))


def score_record(rec, ent, enc, words, match, edges):
    """Per-record statistics from the completion's token entropies `ent` (C,) and its encoding."""
    text, offsets = rec["completion"], enc["offset_mapping"]
    reasoning, answer = segment_masks(text, offsets, rec.get("thinking", True))
    refl = find_reflections(text, offsets, reasoning, words, match)
    ent = ent.double().numpy()
    r_ent, a_ent = ent[np.array(reasoning, dtype=bool)], ent[np.array(answer, dtype=bool)]
    f_ent = np.array([ent[i] for i, _, _ in refl])
    after = np.array([ent[j] for _, j, _ in refl if j is not None])
    mean = lambda x: float(x.mean()) if len(x) else None
    sums = {"n_reasoning": len(r_ent), "ent_reasoning": r_ent.sum(), "n_answer": len(a_ent),
            "ent_answer": a_ent.sum(), "n_reflection": len(f_ent), "ent_reflection": f_ent.sum(),
            "n_after": len(after), "ent_after": after.sum()}
    return {"n_tokens": len(ent), "n_reasoning": len(r_ent), "n_answer": len(a_ent),
            "n_reflections": len(refl), "reflections": [[i, w] for i, _, w in refl],
            "entropy_reasoning": mean(r_ent), "entropy_answer": mean(a_ent),
            "entropy_reflection": mean(f_ent), "entropy_after_reflection": mean(after),
            "ent_reflection_tokens": [round(float(x), 5) for x in f_ent],
            "_sums": {k: float(v) for k, v in sums.items()},
            "_hist_reasoning": np.histogram(np.clip(r_ent, 0, edges[-1]), edges)[0].tolist(),
            "_hist_reflection": np.histogram(np.clip(f_ent, 0, edges[-1]), edges)[0].tolist()}


def shard_batches(items, lengths, batch_size, rank, world):
    """Sort by length (balance and little padding), deal round-robin to ranks, cut into batches."""
    order = sorted(range(len(items)), key=lambda i: -lengths[i])[rank::world]
    return [[items[i] for i in order[a:a + batch_size]] for a in range(0, len(order), batch_size)]


def score_records(model, tok, recs, temp, args, d, words, edges, mname, dname):
    """Step 1 on this rank's shard of one dataset: teacher-forced entropies, then score_record per record.
    The prompt is the record's prompt_ids, the ids it was generated from (older records: rendered again)."""
    prompts = [r["prompt_ids"] if r.get("prompt_ids") is not None else
               common.render_prompt(tok, r["prompt"], args.chat_template_kwargs) for r in recs]
    encs = [tok(r["completion"], add_special_tokens=False, return_offsets_mapping=True) for r in recs]
    items = [i for i in range(len(recs)) if encs[i]["input_ids"]]
    out = []
    for batch in tqdm(shard_batches(items, [len(prompts[i]) + len(encs[i]["input_ids"]) for i in items],
                                    args.batch_size, d.rank, d.world), desc=f"{mname}/{dname}", disable=d.rank != 0):
        stats = token_stats(model, [prompts[i] + encs[i]["input_ids"] for i in batch],
                            [len(prompts[i]) for i in batch], temp, args.chunk_tokens, tok.pad_token_id)
        for i, (_, ent, _) in zip(batch, stats):
            r = recs[i]
            head = {"model": mname, "dataset": dname, "row": r["row"], "id": r.get("id"),
                    "sample": r.get("sample"), "benchmark": r.get("benchmark"), "temperature": temp,
                    "think_closed": common.split_reasoning(r["completion"], r.get("thinking", True))[2],
                    "score": r.get("score")}
            out.append({**head, **score_record(r, ent, encs[i], words, args.match, edges)})
    return out


def memorization_targets(tok, mem_rows, args, mname):
    """Step 2's inputs, before any model loads: each row rendered as sft.py trains it (common.render_sft, the
    reasoning dropped under --answer-only as sft.py --answer-only drops it) -> [(ids, loss mask)]. A row the
    template cannot take (thinking off and a response with reasoning) is a DataError naming the row."""
    seqs = []
    for r in mem_rows:
        try:
            seqs.append(common.render_sft(tok, r["prompt"], r["response"], args.mem_max_len, args.chat_template_kwargs,
                                          "drop" if args.answer_only else "refuse"))
        except UsageError as e:
            hint = "" if args.answer_only else "; pass --answer-only to score the answer alone (sft.py --answer-only)"
            raise DataError(f"{args.memorization}: row {r['row']}: --model {mname}: {e}{hint}") from None
    return seqs


def score_memorization(model, tok, mem_rows, seqs, args, d, mname):
    """Step 2 on this rank's shard: the SFT target's response tokens at temperature 1, greedy window [k, k+m)."""
    starts = [mask.index(True) if True in mask else len(ids) for ids, mask in seqs]
    items = [i for i in range(len(seqs)) if 0 < starts[i] < len(seqs[i][0])]
    win, need = slice(args.mem_k, args.mem_k + args.mem_m), args.mem_k + args.mem_m
    out = []
    for batch in tqdm(shard_batches(items, [len(seqs[i][0]) for i in items], args.batch_size, d.rank, d.world),
                      desc=f"{mname}/memorization", disable=d.rank != 0):
        stats = token_stats(model, [seqs[i][0] for i in batch], [starts[i] for i in batch], 1.0,
                            args.chunk_tokens, tok.pad_token_id)
        for i, (logp, _, am) in zip(batch, stats):
            ref = torch.tensor(seqs[i][0][starts[i]:])                             # (R,)
            hit = (am[win] == ref[win]) if len(ref) >= need else None              # (m,)
            out.append({"model": mname, "row": mem_rows[i]["row"], "id": mem_rows[i]["id"],
                        "n_response_tokens": len(ref), "loglik": float(logp.double().mean()),
                        "greedy_match": None if hit is None else int(hit.all()),
                        "token_acc": None if hit is None else float(hit.double().mean())})
    return out


# --- 3. statistics: pooled ratios with bootstrap intervals over records -------------------------------

def bootstrap_ratio(num, den, n_boot=1000, seed=0):
    """Pooled ratio sum(num)/sum(den) and its 95% percentile-bootstrap interval, resampling records. The
    resamples are drawn about 4M indices at a time (the same numbers as one draw: the generator's stream
    continues), so memory does not grow with n_boot."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if den.sum() <= 0:
        return None, None
    est = float(num.sum() / den.sum())
    rng, per = np.random.default_rng(seed), max(1, (1 << 22) // len(num))
    boot = []
    for a in range(0, n_boot, per):
        idx = rng.integers(0, len(num), size=(min(per, n_boot - a), len(num)))       # (b, N)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot.append(num[idx].sum(1) / den[idx].sum(1))                          # (b,)
    lo, hi = np.nanpercentile(np.concatenate(boot), [2.5, 97.5])
    return est, [float(lo), float(hi)]


def summarize(rows, n_boot, seed=0):
    """One summary object per (model, dataset) from the per-record rows (with their `_sums`)."""
    out = []
    for model, dataset in dict.fromkeys((r["model"], r["dataset"]) for r in rows):
        rs = [r for r in rows if r["model"] == model and r["dataset"] == dataset]
        s = {k: np.array([r["_sums"][k] for r in rs]) for k in rs[0]["_sums"]}
        d = {"model": model, "dataset": dataset, "n_records": len(rs), "n_tokens": int(sum(r["n_tokens"] for r in rs)),
             "n_reasoning_tokens": int(s["n_reasoning"].sum()), "n_reflections": int(s["n_reflection"].sum())}
        metrics = {"reflections_per_1k": (1000 * s["n_reflection"], s["n_reasoning"]),
                   "entropy_reflection": (s["ent_reflection"], s["n_reflection"]),
                   "entropy_after_reflection": (s["ent_after"], s["n_after"]),
                   "entropy_reasoning": (s["ent_reasoning"], s["n_reasoning"]),
                   "entropy_answer": (s["ent_answer"], s["n_answer"])}
        for name, (num, den) in metrics.items():
            d[name], d[name + "_ci"] = bootstrap_ratio(num, den, n_boot, seed)
        out.append(d)
    return out


def summarize_memorization(mem_results, models, args):
    """Per model: mean loglik, greedy exact-match rate (with 95% bootstrap intervals) and token accuracy."""
    out = []
    for mname, _ in models:
        rs = [r for r in mem_results if r["model"] == mname]
        g = [r for r in rs if r["greedy_match"] is not None]
        ones = lambda x: [1] * len(x)  # noqa: E731 -- a plain mean as a pooled ratio
        ll, ll_ci = bootstrap_ratio([r["loglik"] for r in rs], ones(rs), args.bootstrap, args.seed)
        gm, gm_ci = bootstrap_ratio([r["greedy_match"] for r in g], ones(g), args.bootstrap, args.seed)
        ta, _ = bootstrap_ratio([r["token_acc"] for r in g], ones(g), args.bootstrap, args.seed)
        out.append({"model": mname, "data": args.memorization, "n_rows": len(rs), "n_rows_greedy": len(g),
                    "k": args.mem_k, "m": args.mem_m, "loglik": ll, "loglik_ci": ll_ci,
                    "greedy_match": gm, "greedy_match_ci": gm_ci, "token_acc": ta})
    return out


def pooled_histograms(results, edges):
    """{model/dataset: {edges, reasoning, reflection}}: the per-record histogram counts summed."""
    hists = {}
    for r in results:
        h = hists.setdefault(f"{r['model']}/{r['dataset']}", {"edges": edges[r["model"]].tolist(),
                                                              "reasoning": 0, "reflection": 0})
        h["reasoning"] = np.add(h["reasoning"], r["_hist_reasoning"]).tolist()
        h["reflection"] = np.add(h["reflection"], r["_hist_reflection"]).tolist()
    return hists


def summary_grid(summary):
    """The models and the datasets of a summary, each in first-seen order, and its objects by (model, dataset)."""
    return (list(dict.fromkeys(s["model"] for s in summary)), list(dict.fromkeys(s["dataset"] for s in summary)),
            {(s["model"], s["dataset"]): s for s in summary})


def format_table(summary):
    """Rows: models; columns: dataset x metric (a two-line header: dataset, then metric)."""
    cols = [("reflections_per_1k", "refl/1k"), ("entropy_reflection", "H_refl"),
            ("entropy_reasoning", "H_reas"), ("entropy_answer", "H_ans")]
    models, datasets, by = summary_grid(summary)
    w, cw = max(5, *(len(m) for m in models)), 8
    gw = max(len(cols) * (cw + 1) - 1, *(len(d) for d in datasets))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    lines = [" " * w + "".join(f" | {d:<{gw}}" for d in datasets),
             f"{'model':<{w}}" + "".join(f" | {' '.join(f'{c:>{cw}}' for _, c in cols):>{gw}}" for _ in datasets)]
    lines.append("-" * len(lines[1]))
    for m in models:
        cells = lambda d: " ".join(f"{fmt(by.get((m, d), {}).get(k)):>{cw}}" for k, _ in cols)  # noqa: E731
        lines.append(f"{m:<{w}}" + "".join(f" | {cells(d):>{gw}}" for d in datasets))
    return "\n".join(line.rstrip() for line in lines)


# --- the command line ---------------------------------------------------------------------------------

def word_set(text):
    """--words: "wait,Wait,but" -> {"wait", "Wait", "but"} (not empty)."""
    words = {w.strip() for w in text.split(",") if w.strip()}
    if not words:
        raise argparse.ArgumentTypeError("no reflection word given")
    return words


def get_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument_group("inputs").add_argument
    a("--model", action="append", required=True, help="NAME=DIR (or hub id); repeat for several models")
    a("--input", action="append", default=[], help="NAME=FILE of generation records (JSONL); repeat")
    a("--out", required=True, help="output directory")
    a("--chat-template-kwargs", type=cli.chat_template_kwargs, default=None, metavar="JSON", help="template variables "
      "for apply_chat_template when rendering the prompts of records without prompt_ids (as generated)")
    a("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    a = p.add_argument_group("1. entropy at reflection tokens").add_argument
    a("--temperature", type=float, default=None, help="sampling temperature of the scored distribution "
      "(default: the records' own; records without one are refused)")
    a("--words", type=word_set, default=DEFAULT_WORDS, help="comma-separated reflection words")
    a("--match", choices=["word", "token"], default="word", help="word: whole words in the reasoning text, also "
      "split across tokens; token: a whole decoded token equals a word (misses split words)")
    a = p.add_argument_group("2. memorization of the SFT data").add_argument
    a("--memorization", default=None, help="SFT data (STAR-1 question/response) for the memorization metrics")
    a("--mem-k", type=int, default=32, help="reference response tokens given as prefix")
    a("--mem-m", type=int, default=32, help="greedy tokens that must match exactly")
    a("--mem-limit", type=int, default=0, help="first N rows only (0 = all)")
    a("--mem-max-len", type=int, default=8192, help="truncate prompt+response to this many tokens")
    a("--answer-only", action="store_true", help="with thinking off (the prompt already closes the think block), "
      "score each response's answer alone, as sft.py --answer-only trains it (without this flag such rows are "
      "refused)")
    a = p.add_argument_group("3. statistics and compute").add_argument
    a("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (at most 100000)")
    a("--seed", type=int, default=0, help="bootstrap seed")
    a("--batch-size", type=int, default=8, help="records per forward pass")
    a("--chunk-tokens", type=int, default=1024, help="positions per lm_head + kernel chunk (memory)")
    a("--dtype", choices=["bf16", "fp32"], default=None, help="model dtype (default bf16 on GPU, fp32 on CPU)")
    cli.add_compute_flags(a)
    return p.parse_args(argv)


def check_args(args):
    """Every flag value, before any file is read (the flag is named in the message)."""
    if not args.input and not args.memorization:
        raise UsageError("nothing to do: give --input and/or --memorization")
    cli.check_temperature(args.temperature)
    cli.check_min(args, "--batch-size", "--chunk-tokens", "--mem-m", "--bootstrap", "--mem-max-len")
    cli.check_min(args, "--mem-k", "--mem-limit", lo=0)
    if args.bootstrap > MAX_BOOTSTRAP:
        raise UsageError(f"--bootstrap must be <= {MAX_BOOTSTRAP}, got {args.bootstrap}")
    preflight.check_out_dir(args.out)


# --- figures ------------------------------------------------------------------------------------------

def plot_reflection_entropy(summary, path):
    """Grouped bars: entropy at reflection tokens per dataset (groups) and model (bars), 95% CI."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models, datasets, by = summary_grid(summary)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 + 1.3 * len(datasets) * max(1.0, len(models) / 2.5)), 4.2))
    for j, m in enumerate(models):
        xs, ys, err, na = [], [], [[], []], []
        for i, ds in enumerate(datasets):
            s, x = by.get((m, ds), {}), i - 0.4 + width * (j + 0.5)
            if s.get("entropy_reflection") is None:
                na.append(x)
                continue
            v, (lo, hi) = s["entropy_reflection"], s["entropy_reflection_ci"]
            xs.append(x), ys.append(v), err[0].append(max(v - lo, 0)), err[1].append(max(hi - v, 0))
        bars = ax.bar(xs, ys, width * 0.92, yerr=err, capsize=3, label=m, color=f"C{j}",
                      error_kw={"elinewidth": 1, "ecolor": "0.25"})
        for b, v, h in zip(bars, ys, err[1]):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v + h), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
        for x in na:
            ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=8, color=f"C{j}")
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("entropy at reflection tokens (nats)")
    ax.set_title("Next-token entropy at reflection tokens (95% bootstrap CI)", fontsize=11)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=min(len(models), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=150, format="png")
    plt.close(fig)


def plot_histograms(summary, hists, path):
    """Grid (rows: models, cols: datasets) of entropy histograms: reflection vs all reasoning tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models, datasets, by = summary_grid(summary)
    fig, axes = plt.subplots(len(models), len(datasets), squeeze=False, sharex=True,
                             figsize=(1.0 + 3.6 * len(datasets), 1.0 + 2.7 * len(models)))
    kinds = [("reasoning", "all reasoning tokens", {"color": "0.7", "fill": True}),
             ("reflection", "reflection tokens", {"color": "C3", "linewidth": 1.6})]
    for i, m in enumerate(models):
        for j, ds in enumerate(datasets):
            ax, h, s = axes[i][j], hists.get(f"{m}/{ds}"), by.get((m, ds), {})
            means = " · ".join(f"{k[:4]}. {s['entropy_' + k]:.2f}" for k, _, _ in kinds
                               if s.get("entropy_" + k) is not None)
            ax.set_title(f"{m} · {ds}\nmean H: {means or 'n/a'}", fontsize=9)
            ax.spines[["top", "right"]].set_visible(False)
            ax.set_xlabel("entropy (nats)" if i == len(models) - 1 else "")
            ax.set_ylabel("fraction of tokens" if j == 0 else "")
            if h is None:
                continue
            floor = 1.0
            for key, label, kw in kinds:
                c = np.array(h[key], dtype=np.float64)                                # (bins,)
                if c.sum() > 0:
                    ax.stairs(c / c.sum(), np.array(h["edges"]), label=label, **kw)
                    floor = min(floor, 0.5 / c.sum())
            ax.set_yscale("log")
            ax.set_ylim(floor, 1.5)
    handles = [matplotlib.patches.Patch(color="0.7", label=kinds[0][1]),
               matplotlib.lines.Line2D([], [], color="C3", linewidth=1.6, label=kinds[1][1])]
    fig.legend(handles=handles, loc="upper right", frameon=False, fontsize=9, ncol=2)
    fig.suptitle("Entropy at reflection tokens vs all reasoning tokens", fontsize=11, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=150, format="png")
    plt.close(fig)


def main(argv=None):
    args = get_args(argv)
    check_args(args)

    # every input is checked (files, rows, model paths) before any model runs or anything is written
    models, inputs = records.parse_named(args.model, "--model"), records.parse_named(args.input, "--input")
    for name, path in models:  # before any weight is read
        preflight.check_model(path, f"--model {name}", trust_remote_code=args.trust_remote_code)
    data = {name: records.read_for_scoring(path, args.temperature) for name, path in inputs}
    toks = {name: common.load_tokenizer(path, trust_remote_code=args.trust_remote_code, what=f"--model {name}")
            for name, path in models}
    for name, tok in toks.items():
        if not tok.is_fast:
            raise UsageError(f"--model {name}: needs a fast tokenizer (token character offsets)")
        for dname, path in inputs:
            records.check_prompt_ids(path, data[dname][0], tok, name)
    mem_rows = tables.load_pairs(args.memorization) if args.memorization else []
    mem_rows = mem_rows[:args.mem_limit] if args.mem_limit > 0 else mem_rows
    mem_seqs = {name: memorization_targets(tok, mem_rows, args, name) for name, tok in toks.items()}

    # --- compute: each rank scores its shard of the records, one model at a time --------------------------
    d = common.init_dist(args.device, args.dist_timeout)
    dtype = common.pick_dtype(args.dtype, d.device)
    results, mem_results, edges = [], [], {}
    for mname, mpath in models:
        model = common.load_model(mpath, dtype, d.device, trust_remote_code=args.trust_remote_code).eval()
        edges[mname] = np.linspace(0.0, math.log(model.get_output_embeddings().weight.shape[0]), HIST_BINS + 1)
        for dname, (recs, temp) in data.items():
            results += score_records(model, toks[mname], recs, temp, args, d, args.words, edges[mname], mname, dname)
        mem_results += score_memorization(model, toks[mname], mem_rows, mem_seqs[mname], args, d, mname)
        del model
    results, mem_results = common.gather_objects(results), common.gather_objects(mem_results)
    if d.rank != 0:
        return

    # --- outputs (rank 0): everything is computed first, then the files are written as one set ------------
    order = {name: k for k, (name, _) in enumerate(models + inputs)}
    results.sort(key=lambda r: (order[r["model"]], order[r["dataset"]], r["row"]))
    mem_results.sort(key=lambda r: (order[r["model"]], r["row"]))
    summary, hists = summarize(results, args.bootstrap, args.seed), pooled_histograms(results, edges)
    mem_summary = summarize_memorization(mem_results, models, args) if mem_rows else []
    outputs = {}  # files.write_files: a failed write leaves every previous file as it was
    if results:
        outputs["records.jsonl"] = "".join(json.dumps({k: v for k, v in r.items() if k[0] != "_"}) + "\n"
                                           for r in results)
        outputs["summary.json"] = json.dumps(summary, indent=1) + "\n"
        outputs["hist.json"] = json.dumps(hists) + "\n"
        outputs["entropy_reflection.png"] = lambda f: plot_reflection_entropy(summary, f)
        outputs["entropy_hist.png"] = lambda f: plot_histograms(summary, hists, f)
    if mem_rows:
        outputs["memorization.jsonl"] = "".join(json.dumps(r) + "\n" for r in mem_results)
        outputs["memorization.json"] = json.dumps(mem_summary, indent=1) + "\n"
    os.makedirs(args.out, exist_ok=True)
    files.write_files({os.path.join(args.out, name): data for name, data in outputs.items()})
    if results:
        print(format_table(summary))
    for s in mem_summary:
        gm, ta = ("n/a" if s[k] is None else f"{s[k]:.3f}" for k in ("greedy_match", "token_acc"))
        print(f"memorization {s['model']}: loglik {s['loglik']:.3f} | greedy_match(k={s['k']}, m={s['m']}) {gm} "
              f"| token_acc {ta} ({s['n_rows_greedy']}/{s['n_rows']} rows long enough)")
    print(f"wrote {', '.join(outputs)} to {args.out}", flush=True)


if __name__ == "__main__":
    cli.cli_main(main)
