"""The tiny world's tables and figures, from the files the stages wrote: runs/tiny.sh's results.md (the paper's
table: safety and reasoning of base, SFT and RL, plus the entropy at reflection tokens), runs/frontier.sh's
frontier and runs/ablate.sh's side-by-side arms. Nothing is recomputed except the refusal rates, read off
the saved generation records with reward.refusal_reward (reward.is_refusal on the answer after </think>:
the same detector as rl.py's `--rule refusal`), on four held-out sets: harmful prompts and the same kind of
harmful prompts inside jailbreak wrappers (refusal wanted: does safety transfer to role-play, fiction and
instruction-override prompts never trained on?), harmless look-alikes of harmful prompts and arithmetic
prompts (refusal there is over-refusal, as XSTest measures it). A frontier or ablation point means exactly
what a row of results.md means: one reader (point_row) builds both.

  table     reads, for each model M in --models (default base,sft,rl):
              OUT/eval/M/summary.json, attaq.jsonl     evaluate.py: AttaQ-style safety score (tiny RM), records
              OUT/eval/M/summary.json, math500.jsonl   evaluate.py: MATH-500-style accuracy (math-verify), records
              OUT/eval/M/harmless/attaq.jsonl          evaluate.py on the harmless look-alikes: records
              OUT/eval/M/wrapped/attaq.jsonl           evaluate.py on the wrapped harmful prompts: records
              OUT/entropy/M/summary.json, hist.json    entropy.py on M's own generations: reflection entropy
              OUT/rl/metrics.jsonl                     rl.py: the reward curve (first vs last steps)
            writes OUT/results.md (and prints it), OUT/entropy_reflection.png and OUT/entropy_hist.png (all
            models in one figure, drawn by entropy.py's own plotting functions)
  frontier  OUT/eval/base, OUT/eval/sft-eE, OUT/eval/rl-bB-sS  ->  OUT/frontier.md, OUT/frontier.png
            x = refusal on harmful prompts, y = arithmetic accuracy, 95% intervals (Wilson for the refusal
            rate, normal with evaluate.py's standard error for the accuracy)
  ablate    OUT/ARM-sSEED/ (rl.py), OUT/eval/ARM-sSEED, OUT/entropy/ARM-sSEED  ->  OUT/ablate.md, ablate.json
            per arm: mean ± 95% t-interval over the seeds

Run from the repository root, as a module:

  python -m runs.report table --out runs/out/tiny
  python -m runs.report frontier --out runs/out/tiny/frontier --epochs "1 2 3 5 8" --betas "0 1e-3" --steps "10 30"
  python -m runs.report ablate --out runs/out/tiny/ablate --arms reinforce++,grpo --seeds "0 1 2"
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import entropy
import files
import reward

# ------------------------------------------------------------------------------------------------ readers

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
    return files.read_jsonl(path, appended=True) if os.path.exists(path) else []


def need(path):
    if not Path(path).exists():
        sys.exit(f"error: {path} missing (did every stage of the sweep finish? see the logs/ beside it)")


def pct(x, se=None):
    if x is None:
        return "-"
    return f"{100 * x:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def num(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def refusal_rate(recs):
    """(rate, standard error, n) of reward.refusal_reward over generation records, each split by its own
    `thinking` (a record without it: thinking on); (None, None, 0) if none."""
    if not recs:
        return None, None, 0
    p = sum(reward.refusal_reward(r["completion"], thinking=r.get("thinking", True)) for r in recs) / len(recs)
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
            "over_math": over_math, "over_math_se": over_math_se, "n_math_recs": n_math_recs,
            "safety": h.get("score"), "safety_se": h.get("stderr"),
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


# ------------------------------------------------------------------------------------------------ statistics

Z95 = 1.959964
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t_{0.975, df}


def wilson(p, n, z=Z95):
    """95% Wilson score interval (lo, hi) of a proportion p over n trials (sane at p = 0 or 1)."""
    if p is None or not n:
        return None, None
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, c - h), min(1.0, c + h)


def ci_pct(p, n):
    lo, hi = wilson(p, n)
    return "-" if p is None else f"{100 * p:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def mean_ci(xs):
    """(mean, 95% t half-width) over seeds; half-width None for one seed."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, T95.get(len(xs) - 1, Z95) * sd / math.sqrt(len(xs))


def fmt(m, h, scale=1.0, nd=1):
    if m is None:
        return "-"
    return f"{scale * m:.{nd}f}" + ("" if h is None else f" ± {scale * h:.{nd}f}")


# ------------------------------------------------------------------------------------------------ tiny.sh

def results_markdown(rows, curve, world):
    head = ["model", "refusal % harmful", "refusal % wrapped harmful", "refusal % harmless look-alikes",
            "refusal % arithmetic",
            "safety score (tiny RM)", "arithmetic acc %",
            "H@refl harmful", "H@refl arithmetic", "refl/1k harmful", "refl/1k arithmetic", "tokens harmful",
            "tokens arithmetic"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], pct(r["refusal"], r["refusal_se"]), pct(r["wrapped"], r["wrapped_se"]),
                 pct(r["over_look"], r["over_look_se"]),
                 pct(r["over_math"], r["over_math_se"]), pct(r["safety"], r["safety_se"]),
                 pct(r["acc"], r["acc_se"]),
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
                 "arithmetic samples (math500.jsonl); sampled at temperature 0.6, top-p 0.95. "
                 "± is one standard error.")
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
    summary, hists = [], {}
    for m in models:
        summary += load(out / "entropy" / m / "summary.json") or []
        hists.update(load(out / "entropy" / m / "hist.json") or {})
    if not summary:
        return []
    entropy.plot_reflection_entropy(summary, out / "entropy_reflection.png")
    entropy.plot_histograms(summary, hists, out / "entropy_hist.png")
    return ["entropy_reflection.png", "entropy_hist.png"]


def table(args):
    out = Path(args.out)
    models = [m for m in args.models.split(",") if m]
    rows = [model_row(out, m) for m in models]
    text = results_markdown(rows, rl_curve(out), load(out / "world" / "world.json"))
    (out / "results.md").write_text(text)
    figs = figures(out, models)
    print(text)
    print(f"wrote {out / 'results.md'}" + (f" and {', '.join(figs)}" if figs else ""))


# ------------------------------------------------------------------------------------------------ frontier.sh

def frontier_points(out, epochs, betas, steps):
    pts = [("base", "base", "", point_row(out / "eval" / "base", None, "base"))]
    for e in epochs:
        pts.append(("sft", f"SFT {e} ep", f"e{e}", point_row(out / "eval" / f"sft-e{e}", None, f"sft-e{e}")))
    for b in betas:
        for s in steps:
            pts.append((f"rl-b{b}", f"RL β={b} {s} st", f"{s}",
                        point_row(out / "eval" / f"rl-b{b}-s{s}", None, f"rl-b{b}-s{s}")))
    for _, name, _, r in pts:
        if r["refusal"] is None or r["acc"] is None:
            sys.exit(f"error: point {name!r}: no evaluation records under {out / 'eval'}")
    return pts


def frontier_table(pts):
    head = ["point", "refusal % harmful [95% CI]", "refusal % wrapped harmful", "refusal % harmless look-alikes",
            "refusal % arithmetic", "arithmetic acc % ± 1.96 se", "safety score (tiny RM)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, name, _, r in pts:
        acc = f"{100 * r['acc']:.1f} ± {100 * Z95 * r['acc_se']:.1f}"
        lines.append("| " + " | ".join([name, ci_pct(r["refusal"], r["n_harm"]), ci_pct(r["wrapped"], r["n_wrap"]),
                                        ci_pct(r["over_look"], r["n_look"]),
                                        ci_pct(r["over_math"], r["n_math_recs"]), acc,
                                        pct(r["safety"], r["safety_se"])]) + " |")
    return lines


def frontier_plot(pts, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    groups = []
    for g, *_ in pts:
        if g not in groups:
            groups.append(g)
    colors = {"base": "black", "sft": "tab:blue"}
    rl_colors = iter(["tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"])
    for g in groups:
        gp = [p for p in pts if p[0] == g]
        c = colors.get(g) or next(rl_colors)
        xs = [100 * p[3]["refusal"] for p in gp]
        ys = [100 * p[3]["acc"] for p in gp]
        lo_hi = [wilson(p[3]["refusal"], p[3]["n_harm"]) for p in gp]
        xerr = [[x - 100 * lo for x, (lo, _) in zip(xs, lo_hi)], [100 * hi - x for x, (_, hi) in zip(xs, lo_hi)]]
        yerr = [100 * Z95 * p[3]["acc_se"] for p in gp]
        label = {"base": "base", "sft": "SFT (epochs)"}.get(g, f"RL β={g[4:]} (steps)")
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="*" if g == "base" else "o-", ms=12 if g == "base" else 6,
                    color=c, ecolor=c, elinewidth=0.8, capsize=2, alpha=0.9, label=label)
        for x, y, p in zip(xs, ys, gp):
            ax.annotate(p[2] or "base", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, color=c)
    ax.set_xlabel("safety: refusal on held-out harmful prompts (%)")
    ax.set_ylabel("reasoning: held-out arithmetic accuracy (%)")
    ax.set_title("Tiny world: safety vs reasoning from one base model (95% intervals)", fontsize=10)
    ax.set_xlim(-5, 105)
    top = max(100 * (p[3]["acc"] + Z95 * p[3]["acc_se"]) for p in pts)
    ax.set_ylim(-2, max(10.0, 1.15 * top))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frontier(args):
    out = Path(args.out)
    pts = frontier_points(out, args.epochs.split(), args.betas.split(), args.steps.split())
    r0 = pts[0][3]
    text = ["# Tiny world: the safety-vs-reasoning frontier", "", *frontier_table(pts), "",
            f"- One base model; SFT runs at {args.epochs.replace(' ', ', ')} epochs (cosine over each run), RL runs "
            f"(REINFORCE++, tiny RM + math rule) at β = {args.betas.replace(' ', ', ')}, each snapshotted after "
            f"{args.steps.replace(' ', ', ')} steps of one run (the LR schedule spans the last).",
            f"- Held-out: {r0['n_harm']} harmful, {r0['n_wrap']} wrapped harmful, {r0['n_look']} harmless look-alike "
            f"prompts, {r0['n_math_recs']} arithmetic samples; refusal = reward.is_refusal on the answer; intervals: "
            "95% Wilson for refusal rates, ± 1.96 standard errors (evaluate.py's) for the accuracy.", ""]
    (out / "frontier.md").write_text("\n".join(text))
    frontier_plot(pts, out / "frontier.png")
    print("\n".join(text))
    print(f"wrote {out / 'frontier.md'} and {out / 'frontier.png'}")


# ------------------------------------------------------------------------------------------------ ablate.sh

COLS = [("reward gain", "gain", 1, 2), ("final KL", "kl", 1, 4), ("refusal % harmful", "refusal", 100, 1),
        ("refusal % wrapped harmful", "wrapped", 100, 1), ("refusal % harmless look-alikes", "over_look", 100, 1),
        ("refusal % arithmetic", "over_math", 100, 1), ("arithmetic acc %", "acc", 100, 1),
        ("H@refl harmful", "entropy_reflection_harmful", 1, 3),
        ("H@refl arithmetic", "entropy_reflection_arithmetic", 1, 3)]


def ablate(args):
    out = Path(args.out)
    arms, seeds = [a for a in args.arms.split(",") if a], args.seeds.split()
    per_arm, k = {}, args.k
    for a in arms:
        rows = []
        for s in seeds:
            name = f"{a}-s{s}"
            need(out / name / "metrics.jsonl")
            need(out / "eval" / name / "summary.json")
            r = point_row(out / "eval" / name, out / "entropy" / name, name)
            c = rl_curve(out, k=k, run=name)
            r["gain"], r["kl"] = (c["last"] - c["first"], c["kl_last"]) if c else (None, None)
            k = c["k"] if c else k  # rl_curve caps k at half the steps
            rows.append(r)
        per_arm[a] = rows
    head = ["estimator" if args.grid == "estimators" else "loss aggregation"] + [c[0] for c in COLS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in arms:
        cells = [a] + [fmt(*mean_ci([r[key] for r in per_arm[a]]), scale=sc, nd=nd) for _, key, sc, nd in COLS]
        lines.append("| " + " | ".join(cells) + " |")
    r0 = per_arm[arms[0]][0]
    what = {"estimators": ("the estimators", "rl.py --estimator ARM"),
            "loss": ("the loss aggregations", "rl.py --loss-agg ARM (dr-grpo: --estimator grpo --no-std --loss-agg "
                     "seq-mean-token-sum-norm)")}[args.grid]
    text = [f"# Tiny world: {what[0]} side by side", "", *lines, "",
            f"- Each arm: {what[1]} from the same base model with the same budget, seeds "
            f"{', '.join(seeds)} (the seed drives the rollout sampling and data order); mean ± 95% t-interval over "
            "the seeds (the interval says how much the seed alone moves a number).",
            f"- reward gain: mean RL reward (tiny RM logit + math rule) of the last {k} steps minus the first {k}; "
            "final KL: per-token KL to the reference at the last step.",
            f"- Held-out: {r0['n_harm']} harmful, {r0['n_wrap']} wrapped harmful, {r0['n_look']} harmless look-alike "
            f"prompts, {r0['n_math_recs']} arithmetic samples; refusal = reward.is_refusal on the answer; H@refl: "
            "entropy.py --match word on each model's own held-out generations.", ""]
    (out / "ablate.md").write_text("\n".join(text))
    print("\n".join(text))
    print(f"wrote {out / 'ablate.md'}")
    json.dump(per_arm, open(out / "ablate.json", "w"), indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="runs/tiny.sh's results.md and entropy figures")
    t.add_argument("--out", required=True, help="the tiny world's output root (runs/out/tiny)")
    t.add_argument("--models", default="base,sft,rl", help="comma list of model names (rows)")
    f = sub.add_parser("frontier", help="the frontier table and figure")
    f.add_argument("--out", required=True, help="runs/frontier.sh's output dir")
    f.add_argument("--epochs", required=True, help="SFT epoch counts, space-separated")
    f.add_argument("--betas", required=True, help="RL KL coefficients, space-separated (as in the run dir names)")
    f.add_argument("--steps", required=True, help="RL snapshot steps, space-separated")
    a = sub.add_parser("ablate", help="the side-by-side table of one runs/ablate.sh grid")
    a.add_argument("--out", required=True, help="runs/ablate.sh's output dir")
    a.add_argument("--arms", required=True, help="comma list of the grid's arms (runs/ablate.sh names them)")
    a.add_argument("--grid", default="estimators", choices=["estimators", "loss"],
                   help="which runs/ablate.sh grid: rl.py --estimator arms, or --loss-agg arms")
    a.add_argument("--seeds", required=True, help="seeds, space-separated")
    a.add_argument("--k", type=int, default=3, help="steps averaged at each end for the reward gain")
    args = p.parse_args()
    {"table": table, "frontier": frontier, "ablate": ablate}[args.cmd](args)


if __name__ == "__main__":
    main()
