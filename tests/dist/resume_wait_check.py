"""Run under torchrun (2 gloo ranks) by tests/test_checkpoint.py, with a 5-second collective timeout: rank 0
alone hashes the model's files for evaluate.py's fingerprint (every byte on a first run) and rewrites the
record files, which can take longer than --dist-timeout; the other ranks wait for it in common.barrier,
outside any collective, before records.resume_records broadcasts rank 0's verdict. argv[1]: an empty OUT.
One line per rank."""
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, ".")
import common  # noqa: E402
import records  # noqa: E402

TIMEOUT, SLOW = 5.0, 6.5  # seconds

if __name__ == "__main__":
    d = common.init_dist("cpu", timeout_min=TIMEOUT / 60)
    args = SimpleNamespace(out=sys.argv[1], overwrite=False)
    os.makedirs(args.out, exist_ok=True)
    fp = {"math500": {"model": "m"}}
    if d.rank == 0:
        time.sleep(SLOW)  # the fingerprint: hashing the model's files
    try:
        done = records.resume_records(args, ["math500"], fp if d.rank == 0 else None, None, d.rank,
                                      {"math500": "rule"})
        print(f"rank {d.rank}: resumed {sorted(done)} after rank 0's slow fingerprint", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"rank {d.rank}: the wait for rank 0 stopped ({type(e).__name__})", flush=True)
    sys.stdout.flush()
    os._exit(0)  # a timed-out group is broken: no teardown
