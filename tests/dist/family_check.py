"""Run under torchrun by tests/test_families.py: every family's SFT and RL runs in ONE set of processes
(the start-up is paid once). argv[1]: a JSON list of [stage, argv] pairs."""
import json
import sys

sys.path.insert(0, ".")
import cli  # noqa: E402
import common  # noqa: E402
import rl  # noqa: E402
import sft  # noqa: E402

if __name__ == "__main__":
    common.init_dist()
    for stage, argv in json.load(open(sys.argv[1])):
        (sft if stage == "sft" else rl).main(argv)
        common.barrier()
    cli.finish()
