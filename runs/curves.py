"""Training curves: any run's metrics.jsonl (sft.py or rl.py) as one PNG, one panel per quantity over steps.

Panels, each drawn only when the run logged it: reward (rl.py), loss (sft.py; not drawn beside a reward), KL to
the reference (rl.py), mean token entropy (both), and the entropy at reflection tokens (`ent_reflect`, with the count
`n_reflect` on a second axis, when rl.py logs them). A resumed run's metrics.jsonl may repeat steps; the
last record of each step wins.

  python -m runs.curves runs/out/tiny/rl/metrics.jsonl --out runs/out/tiny/curves_rl.png [--title RL]
  python -m runs.curves a/metrics.jsonl b/metrics.jsonl --label a --label b --out both.png   # overlaid
  python -m runs.curves a/metrics.jsonl b/metrics.jsonl --out a.png --out b.png               # one PNG each
"""
import argparse
import sys

import files
from errors import DataError

# (key, panel title); a panel is drawn when any run has the key
PANELS = [("reward", "reward (mean per sample)"), ("loss", "loss"), ("kl", "KL to the reference (per token)"),
          ("entropy", "entropy (mean per token, nats)"), ("ent_reflect", "entropy at reflection tokens (nats)")]


def read_metrics(path):
    """The records of a metrics.jsonl in step order, the last of each step (files.read_jsonl's torn-line rule);
    stops with the file and row on a malformed one."""
    try:
        recs = files.read_jsonl(path, appended=True)
    except DataError as e:
        sys.exit(f"error: {e}")
    by_step = {}
    for i, r in enumerate(recs, 1):
        if "step" not in r:
            sys.exit(f"error: {path}: record {i}: no 'step' field")
        by_step[int(r["step"])] = r
    if not by_step:
        sys.exit(f"error: {path}: no metrics rows")
    return [by_step[s] for s in sorted(by_step)]


def series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(runs, out, title=None):
    """runs: [(label, rows)]. Writes one PNG with a panel per quantity present; returns the panel keys."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    keys = [(k, t) for k, t in PANELS if any(series(rows, k)[0] for _, rows in runs)]
    if any(k == "reward" for k, _ in keys):  # an RL run: its PPO surrogate loss says little; show the reward
        keys = [(k, t) for k, t in keys if k != "loss"]
    if not keys:
        sys.exit(f"error: none of {', '.join(k for k, _ in PANELS)} in the metrics")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, (k, t) in zip(axes[0], keys):
        for label, rows in runs:
            x, y = series(rows, k)
            if x:
                ax.plot(x, y, marker="." if len(x) < 40 else None, label=label)
        if k == "ent_reflect" and len(runs) == 1:  # how many reflection tokens each point averages
            x, y = series(runs[0][1], "n_reflect")
            if x:
                ax2 = ax.twinx()
                ax2.bar(x, y, color="0.85", zorder=0, width=0.8)
                ax2.set_ylabel("n_reflect (tokens)", color="0.5")
                ax.set_zorder(ax2.get_zorder() + 1)
                ax.patch.set_visible(False)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [k for k, _ in keys]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", nargs="+", help="metrics.jsonl file(s) of sft.py / rl.py runs")
    p.add_argument("--out", action="append", required=True,
                   help="output PNG: once (all files overlaid in one figure) or once per file (one figure each)")
    p.add_argument("--label", action="append", default=None, help="legend label per file (default: the file)")
    p.add_argument("--title", action="append", default=None, help="figure title (once per --out)")
    args = p.parse_args()
    labels = args.label or args.metrics
    if len(labels) != len(args.metrics):
        sys.exit(f"error: --label given {len(labels)} times for {len(args.metrics)} metrics files")
    if len(args.out) not in (1, len(args.metrics)):
        sys.exit(f"error: --out given {len(args.out)} times for {len(args.metrics)} metrics files (1 or one each)")
    titles = args.title or [None] * len(args.out)
    if len(titles) != len(args.out):
        sys.exit(f"error: --title given {len(titles)} times for {len(args.out)} --out")
    runs = [(lab, read_metrics(m)) for lab, m in zip(labels, args.metrics)]
    groups = [runs] if len(args.out) == 1 else [[r] for r in runs]
    for out, title, group in zip(args.out, titles, groups):
        keys = plot(group, out, title)
        print(f"wrote {out} ({', '.join(keys)})")


if __name__ == "__main__":
    main()
