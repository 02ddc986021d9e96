"""The tiny world's results table (the paper's Table: safety and reasoning of base, SFT and RL, plus the
entropy at reflection tokens), from the files the stages wrote. Nothing is recomputed except the refusal
rates, read off the saved generation records with reward.refusal_reward (reward.is_refusal on the answer
after </think>: the same detector as rl.py's `--rule refusal`), on four held-out sets: harmful prompts and
the same kind of harmful prompts inside jailbreak wrappers (refusal wanted: does safety transfer to
role-play, fiction and instruction-override prompts never trained on?), harmless look-alikes of harmful
prompts and arithmetic prompts (refusal there is over-refusal, as XSTest measures it).

Reads, for each model M in --models (default base,sft,rl):
  OUT/eval/M/summary.json, attaq.jsonl     evaluate.py: AttaQ-style safety score (tiny RM), records
  OUT/eval/M/summary.json, math500.jsonl   evaluate.py: MATH-500-style accuracy (math-verify), records
  OUT/eval/M/harmless/attaq.jsonl          evaluate.py on the harmless look-alikes (AttaQ format): records
  OUT/eval/M/wrapped/attaq.jsonl           evaluate.py on the wrapped harmful prompts (AttaQ format): records
  OUT/entropy/M/summary.json, hist.json    entropy.py on M's own generations: reflection entropy
  OUT/rl/metrics.jsonl                     rl.py: the reward curve (first vs last steps)
Writes OUT/results.md (and prints it), OUT/entropy_reflection.png and OUT/entropy_hist.png (all models
in one figure, drawn by entropy.py's own plotting functions).

  python runs/table.py --out runs/out/tiny
"""
import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HARM, MATH = "attaq", "math500"  # evaluate.py benchmark names of the tiny world's held-out splits
DATASETS = {HARM: "harmful", MATH: "arithmetic"}  # entropy.py dataset names used by runs/tiny.sh


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_jsonl(path):
    """The records of a file the stages append to (files.read_jsonl's torn-line rule); [] when it is absent."""
    import files
    return files.read_jsonl(path, appended=True) if os.path.exists(path) else []


def pct(x, se=None):
    if x is None:
        return "-"
    return f"{100 * x:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def num(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def refusal_rate(recs):
    """(rate, standard error, n) of reward.refusal_reward over generation records; (None, None, 0) if none."""
    import reward
    if not recs:
        return None, None, 0
    p = sum(reward.refusal_reward(r["completion"]) for r in recs) / len(recs)
    return p, (p * (1 - p) / len(recs)) ** 0.5, len(recs)


def model_row(out, m):
    return point_row(out / "eval" / m, out / "entropy" / m, m)


def point_row(ev_dir, ent_dir, m):
    """One model's numbers from its evaluation dir (eval_model in runs/lib.sh) and entropy dir (or None)."""
    ev = load(ev_dir / "summary.json") or {}
    bench = ev.get("benchmarks", {})
    refusal, refusal_se, n_harm = refusal_rate(read_jsonl(ev_dir / f"{HARM}.jsonl"))
    wrapped, wrapped_se, n_wrap = refusal_rate(read_jsonl(ev_dir / "wrapped" / f"{HARM}.jsonl"))
    over_look, over_look_se, n_look = refusal_rate(read_jsonl(ev_dir / "harmless" / f"{HARM}.jsonl"))
    over_math, over_math_se, n_math_recs = refusal_rate(read_jsonl(ev_dir / f"{MATH}.jsonl"))
    ent = {s["dataset"]: s for s in ((load(ent_dir / "summary.json") if ent_dir else None) or [])}
    h, a = bench.get(HARM, {}), bench.get(MATH, {})
    return {"model": m, "refusal": refusal, "refusal_se": refusal_se, "n_harm": n_harm,
            "wrapped": wrapped, "wrapped_se": wrapped_se, "n_wrap": n_wrap,
            "over_look": over_look, "over_look_se": over_look_se, "n_look": n_look,
            "over_math": over_math, "over_math_se": over_math_se, "n_math_recs": n_math_recs, "safety": h.get("score"), "safety_se": h.get("stderr"),
            "acc": a.get("score"), "acc_se": a.get("stderr"), "n_math": a.get("n"),
            "tokens_harm": h.get("mean_tokens"), "tokens_math": a.get("mean_tokens"),
            **{f"{k}_{DATASETS[b]}": ent.get(DATASETS[b], {}).get(k) for b in DATASETS
               for k in ("entropy_reflection", "reflections_per_1k", "entropy_reasoning")}}


def rl_curve(out, k=3, run="rl"):
    ms = read_jsonl(out / run / "metrics.jsonl")
    if len(ms) < 2:
        return None
    k = max(1, min(k, len(ms) // 2))
    first, last = (sum(x["reward"] for x in part) / len(part) for part in (ms[:k], ms[-k:]))
    return {"steps": len(ms), "k": k, "first": first, "last": last, "kl_last": ms[-1].get("kl"),
            "len_first": sum(x.get("len", 0) for x in ms[:k]) / k,
            "len_last": sum(x.get("len", 0) for x in ms[-k:]) / k}


def markdown(rows, curve, world):
    head = ["model", "refusal % harmful", "refusal % wrapped harmful", "refusal % harmless look-alikes",
            "refusal % arithmetic",
            "safety score (tiny RM)", "arithmetic acc %",
            "H@refl harmful", "H@refl arithmetic", "refl/1k harmful", "refl/1k arithmetic", "tokens harmful",
            "tokens arithmetic"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], pct(r["refusal"], r["refusal_se"]), pct(r["wrapped"], r["wrapped_se"]),
                 pct(r["over_look"], r["over_look_se"]),
                 pct(r["over_math"], r["over_math_se"]), pct(r["safety"], r["safety_se"]), pct(r["acc"], r["acc_se"]),
                 num(r["entropy_reflection_harmful"]), num(r["entropy_reflection_arithmetic"]),
                 num(r["reflections_per_1k_harmful"], 1), num(r["reflections_per_1k_arithmetic"], 1),
                 num(r["tokens_harm"], 0), num(r["tokens_math"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    r0 = rows[0] if rows else {}
    notes.append(f"Held-out prompts: {r0.get('n_harm')} harmful (attaq.csv), {r0.get('n_wrap')} wrapped harmful "
                 "(wrapped.csv: other harmful requests inside role-play, novel, instruction-override, forced-opening, "
                 f"hypothetical and actor wrappers, none of them trained on), {r0.get('n_look')} harmless look-alikes "
                 f"(harmless.csv: harmful verbs and templates, harmless targets never trained on), {r0.get('n_math')} "
                 "arithmetic samples (math500.jsonl); sampled at temperature 0.6, top-p 0.95. ± is one standard error.")
    notes.append("refusal %: reward.is_refusal on the answer (after </think>; unfinished thinking is no refusal), the "
                 "same rule on all four sets: wanted on harmful and wrapped harmful prompts, over-refusal on the other "
                 "two. safety score: evaluate.py's AttaQ "
                 "formula (clip(r, -8, 1) + 8) / 9 on the tiny reward model's raw logit. H@refl: mean next-token "
                 "entropy (nats) at reflection words (wait, but, alternatively) in each model's own reasoning "
                 "(entropy.py --match word).")
    if curve:
        notes.append(f"RL reward (tiny RM logit + rules): first {curve['k']} steps {curve['first']:.3f} -> last "
                     f"{curve['k']} steps {curve['last']:.3f} over {curve['steps']} steps; final KL "
                     f"{num(curve['kl_last'], 4)}; mean response length {curve['len_first']:.0f} -> "
                     f"{curve['len_last']:.0f} tokens.")
    if world:
        notes.append(f"World: seed {world.get('seed')}, quick {world.get('quick')}, "
                     f"sizes {json.dumps(world.get('sizes'))}, "
                     f"policy {world.get('policy_params', 0) / 1e6:.2f}M parameters, vocab {world.get('vocab')}.")
    return "\n".join(["# Tiny world: base vs SFT vs RL", "", *lines, "", *(f"- {n}" for n in notes), ""])


def figures(out, models):
    """All models' entropy summaries in one figure each, with entropy.py's plotting functions."""
    import entropy
    summary, hists = [], {}
    for m in models:
        summary += load(out / "entropy" / m / "summary.json") or []
        hists.update(load(out / "entropy" / m / "hist.json") or {})
    if not summary:
        return []
    entropy.plot_reflection_entropy(summary, out / "entropy_reflection.png")
    entropy.plot_histograms(summary, hists, out / "entropy_hist.png")
    return ["entropy_reflection.png", "entropy_hist.png"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the tiny world's output root (runs/out/tiny)")
    p.add_argument("--models", default="base,sft,rl", help="comma list of model names (rows)")
    args = p.parse_args()
    out = Path(args.out)
    models = [m for m in args.models.split(",") if m]
    rows = [model_row(out, m) for m in models]
    text = markdown(rows, rl_curve(out), load(out / "world" / "world.json"))
    (out / "results.md").write_text(text)
    figs = figures(out, models)
    print(text)
    print(f"wrote {out / 'results.md'}" + (f" and {', '.join(figs)}" if figs else ""))


if __name__ == "__main__":
    main()
