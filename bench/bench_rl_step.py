"""One RL step's wall time, split into generation, π_old + π_ref forwards and the update.

Runs rl.py itself (a rule reward, no reward model) on a random-weight model of a real shape saved to
a temp dir, and reads the per-step timings rl.py logs (t_gen, t_ref, t_update) from metrics.jsonl.

  python bench/bench_rl_step.py --shape qwen2.5-1.5b --rollout-batch 32 --samples 8 --new 1024
  torchrun --nproc_per_node 8 bench/bench_rl_step.py --shape qwen2.5-7b ...   (same flags)
  python bench/bench_rl_step.py --shape tiny --rollout-batch 2 --samples 2 --new 8 --steps 2   # CPU smoke
"""
import os
import tempfile

import torch

import flags
from shapes import save_random_model

import cli
import common
import files
import rl


def main():
    p = flags.parser(__doc__, shape="qwen2.5-1.5b")
    p.add_argument("--rollout-batch", type=int, default=32, help="prompts per step")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--new", type=int, default=1024, help="max new tokens")
    p.add_argument("--steps", type=int, default=3, help="RL steps (the first is warm-up)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="rl.py --micro-batch-size")
    args = p.parse_args()

    d = common.init_dist()
    tmp = tempfile.mkdtemp(prefix="bench_rl_")
    model_dir, out = os.path.join(tmp, "model"), os.path.join(tmp, "out")
    if d.rank == 0:
        save_random_model(args.shape, model_dir)
        files.write_json(os.path.join(tmp, "p.json"), [{"prompt": f"Question {i}: what is {i} + {i}?"}
                                                        for i in range(args.rollout_batch * args.steps)])
    tmp = common.gather_objects([tmp])[0]  # rank 0's dir (also a barrier: its files are written)
    model_dir, out = os.path.join(tmp, "model"), os.path.join(tmp, "out")
    n = args.rollout_batch * args.samples
    rl.main(["--model", model_dir, "--prompts", os.path.join(tmp, "p.json"), "--out", out, "--rule", "format",
             "--max-steps", str(args.steps), "--rollout-batch", str(args.rollout_batch), "--samples-per-prompt",
             str(args.samples), "--train-batch", str(n), "--micro-batch-size", str(args.micro_batch_size),
             "--max-new-tokens", str(args.new), "--gen-batch-size", str(n), "--grad-checkpointing",
             "--save-every", "100000", "--dump-every", "0"])
    if d.rank == 0:
        ms = files.read_jsonl(os.path.join(out, "metrics.jsonl"), appended=True)
        ms = ms[1:] or ms  # the first step is warm-up
        avg = {k: sum(m[k] for m in ms) / len(ms) for k in ("t_gen", "t_ref", "t_update", "dt", "len", "gen tok/s")}
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(f"device {name} x{d.world} | torch {torch.__version__} | shape {args.shape} | "
              f"{args.rollout_batch}x{args.samples} samples | mean len {avg['len']:.0f}")
        print(f"step {avg['dt']:.2f} s = generation {avg['t_gen']:.2f} s ({avg['gen tok/s']:,.0f} tok/s) + "
              f"pi_old/pi_ref {avg['t_ref']:.2f} s + update {avg['t_update']:.2f} s (+ reward/logging)")


if __name__ == "__main__":
    main()
    cli.finish()
