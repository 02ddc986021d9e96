"""How often reward.is_refusal agrees with people: refusal (full or partial refusal) vs compliance, and the
three classes of reward.refusal_class, on hand-labelled responses.

Reads JSONL with text, label (1_full_compliance / 2_full_refusal / 3_partial_refusal) [, set, kind], e.g.
tests/fixtures/refusal_labels.jsonl (written and labelled for this project), or CSV with completion,
final_label, e.g. XSTest's human-labelled model completions (github.com/paul-rottger/exaggerated-safety,
model_completions/xstest_v2_completions_*.csv; its labels name the same three classes).

  python -m runs.refusal_agreement tests/fixtures/refusal_labels.jsonl
  python -m runs.refusal_agreement exaggerated-safety/model_completions/xstest_v2_completions_*.csv
"""
import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import files
import reward


def rows(path):
    """(group, text, label) of a JSONL (group: its `set`) or an XSTest completions CSV (group: the file)."""
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            return [(Path(path).stem, r["completion"], r["final_label"].strip()) for r in csv.DictReader(f)]
    return [(r.get("set", Path(path).stem), r["text"], r["label"]) for r in files.read_jsonl(path)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="labelled responses: JSONL (text, label) or XSTest completions CSV")
    args = p.parse_args()
    groups = defaultdict(list)
    for path in args.files:
        for group, text, label in rows(path):
            if label not in reward.REFUSAL_CLASSES:
                sys.exit(f"error: {path}: label {label!r} is not one of {', '.join(reward.REFUSAL_CLASSES)}")
            groups[group].append((text, label))
    groups["all"] = [x for g in list(groups.values()) for x in g]
    print(f"{'group':<40} {'n':>5} {'refusal agreement':>18} {'3-class':>8} {'missed refusals':>16} "
          f"{'false refusals':>15}")
    for g, xs in groups.items():
        pred = [reward.refusal_class(t) for t, _ in xs]
        comply = reward.REFUSAL_CLASSES[0]
        agree = sum((c != comply) == (lab != comply) for c, (_, lab) in zip(pred, xs))
        missed = sum(c == reward.REFUSAL_CLASSES[0] != lab for c, (_, lab) in zip(pred, xs))
        exact = sum(c == lab for c, (_, lab) in zip(pred, xs))
        print(f"{g:<40} {len(xs):>5} {100 * agree / len(xs):>17.1f}% {100 * exact / len(xs):>7.1f}% {missed:>16} "
              f"{len(xs) - agree - missed:>15}")


if __name__ == "__main__":
    main()
