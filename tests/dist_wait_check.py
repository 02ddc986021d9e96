"""Run under torchrun (2 gloo ranks) by tests/test_gpu.py, with a 2-second collective timeout: the uneven
waits of the stages outlast it and survive, because they wait in common.barrier, outside any collective.
argv[1]: a model dir. Prints one line per case."""
import os
import sys
import time

sys.path.insert(0, ".")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common  # noqa: E402

SLOW = 3.0  # seconds, longer than the timeout

if __name__ == "__main__":
    d = common.init_dist("cpu", timeout_min=2 / 60)
    # evaluate: a rank that has generated everything waits for one still generating
    if d.rank == 1:
        time.sleep(SLOW)
    common.barrier()
    print(f"rank {d.rank}: waited for a slower rank's generation", flush=True)
    # evaluate: a rank without a grading shard gathers while another loads its graders and grades
    if d.rank == 0:
        time.sleep(SLOW)
    got = common.gather_objects([d.rank])
    print(f"rank {d.rank}: gathered {got} after a slower rank's grading", flush=True)
    # build_policy: rank 0 alone downloads and loads the checkpoint before broadcasting it
    load_model = common.load_model

    def slow_load(*a, **kw):
        time.sleep(SLOW)
        return load_model(*a, **kw)

    common.load_model = slow_load
    policy, _ = common.build_policy(sys.argv[1], d, torch.float32)
    w = policy.hf.lm_head.weight.full_tensor()
    total = common.all_reduce(w.sum().reshape(1).clone())
    print(f"rank {d.rank}: built the policy while rank 0 loaded slowly (weights agree: "
          f"{bool(torch.allclose(total, 2 * w.sum()))})", flush=True)
    # the timeout is real: the same wait inside a collective is stopped
    if d.rank == 1:
        time.sleep(SLOW)
    try:
        dist.all_reduce(torch.ones(1))
        print(f"rank {d.rank}: the collective did not time out", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"rank {d.rank}: a collective wait past the timeout stopped ({type(e).__name__})", flush=True)
    sys.stdout.flush()
    os._exit(0)  # the group is broken by the timeout: no teardown
