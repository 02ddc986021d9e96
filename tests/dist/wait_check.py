"""Run under torchrun (2 gloo ranks) by tests/test_gpu.py, with a 5-second collective timeout: the uneven
waits of the stages outlast it and survive, because they wait in common.barrier, outside any collective
(evaluate.py's wait for the ranks still generating is the same barrier as build_policy's, and as the one
before records.resume_records broadcasts rank 0's verdict on the records). The timeout leaves room for the
lockstep collectives on a loaded machine. argv[1]: a model dir, argv[2]: an empty OUT. One line per case."""
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, ".")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common  # noqa: E402
import records  # noqa: E402

TIMEOUT, SLOW = 5.0, 6.5  # seconds

if __name__ == "__main__":
    d = common.init_dist("cpu", timeout_min=TIMEOUT / 60)
    # evaluate: a rank without a grading shard gathers while another loads its graders and grades
    if d.rank == 1:
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
    # evaluate.py's resume: rank 0 alone hashes the model's files for the fingerprint (every byte on a first
    # run) and rewrites the record files; the others wait for it before the broadcast of its verdict
    out = SimpleNamespace(out=sys.argv[2], overwrite=False)
    os.makedirs(out.out, exist_ok=True)
    if d.rank == 0:
        time.sleep(SLOW)
    done = records.resume_records(out, ["math500"], {"math500": {"model": "m"}} if d.rank == 0 else None, None,
                                  d.rank, {"math500": "rule"})
    print(f"rank {d.rank}: resumed {sorted(done)} after rank 0's slow fingerprint", flush=True)
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
