"""Is engine.py's decode step safe to capture in a CUDA graph? Record every op it dispatches and say.

    python bench/audit_step.py                    # tiny Qwen2 / Qwen3 / Llama on the CPU and the meta device
    python bench/audit_step.py --device cuda      # the same on the GPU, at the tiny shapes
    python bench/audit_step.py --ops              # also print the op list of one decode step

A graph replays a fixed list of kernels on fixed addresses, so inside the captured region
(`Decoder.step`: embedding, every layer, lm_head, temperature, top-p, sampling, bookkeeping) nothing
may
  - copy a value to the host (.item(), int(), bool(), .tolist(): aten._local_scalar_dense; torch.equal),
  - allocate by a data-dependent size (nonzero, masked_select, unique, boolean-mask indexing, ...),
  - create or read a host tensor (torch.tensor(python data): aten.lift_fresh; any CPU tensor),
  - dispatch other ops or shapes at the next step of the same (batch bucket, length bucket).
`audit` runs the step twice under a TorchDispatchMode that records every op with its shapes and
devices and returns the problems found. On the CPU every tensor is a host tensor, so the device
rule is checked on the meta device (shapes without data; a host tensor there stands out, and any
data-dependent op raises), and the values-dependent rules on real CPU tensors.
"""
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import flags
import engine

SYNC_OPS = {
    "_local_scalar_dense": "copies a value to the host (.item(), int(), float(), bool(), .tolist())",
    "equal": "returns a Python bool (a host sync)",
    "is_nonzero": "returns a Python bool (a host sync)",
    "nonzero": "output size depends on the data (a host sync)",
    "masked_select": "output size depends on the data (a host sync)",
    "unique_consecutive": "output size depends on the data (a host sync)",
    "unique_dim": "output size depends on the data (a host sync)",
    "_unique": "output size depends on the data (a host sync)",
    "_unique2": "output size depends on the data (a host sync)",
    "bincount": "output size depends on the data (a host sync)",
    "lift_fresh": "a tensor made from Python data inside the step (host memory)",
    "lift_fresh_copy": "a tensor made from Python data inside the step (host memory)",
}
INDEX_OPS = ("index", "index_put", "index_put_", "_index_put_impl_")


class OpLog(TorchDispatchMode):
    """Records (op, input shapes, output shapes) of every dispatched op; notes each rule broken."""

    def __init__(self, device):
        super().__init__()
        self.device, self.ops, self.problems = torch.device(device), [], []

    def __enter__(self):
        # .tolist() and .numpy() of a CPU tensor read its memory without dispatching an op (on CUDA they
        # dispatch a copy to the host): watched by wrapping them while the mode is on
        self.saved = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy")}
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, self._host_read(n, f))
        return super().__enter__()

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        return super().__exit__(*exc)

    def _host_read(self, name, f):
        def read(t, *a, **kw):
            self.problems.append(f"Tensor.{name}: copies the tensor to the host (a host sync)")
            return f(t, *a, **kw)
        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        why = SYNC_OPS.get(name)
        if name == "repeat_interleave" and kwargs.get("output_size") is None and any(t.dim() for t in ins[:1]):
            why = "output size depends on the data (a host sync)"
        if name in INDEX_OPS and any(t.dtype in (torch.bool, torch.uint8) for t in tree_leaves(args[1:2])
                                     if isinstance(t, torch.Tensor)):
            why = "boolean-mask indexing (a nonzero inside: a host sync)"
        try:
            out = func(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- on the meta device a data-dependent op raises: that is the finding
            self.problems.append(f"{func}: raised {type(e).__name__} ({str(e).splitlines()[0][:120]})")
            raise
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        hosts = [t for t in ins + outs if t.device.type != self.device.type]
        if hosts and why is None:
            why = f"a {hosts[0].device.type} tensor {tuple(hosts[0].shape)} in the step (host memory)"
        if why:
            self.problems.append(f"{func}: {why}")
        self.ops.append((str(func), tuple(tuple(t.shape) for t in ins), tuple(tuple(t.shape) for t in outs)))
        return out


def tiny_model(family, device, dtype=torch.float32, layers=2):
    """A random tiny decoder of `family` (qwen2 | qwen3 | llama) with grouped-query heads, on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
    C = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}[family]
    cfg = C(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=family != "llama")
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@torch.no_grad()
def audit(hf, Bb=4, Lb=32, temperature=1.0, top_p=0.9, steps=2):
    """Run Decoder.step `steps` times at one (Bb, Lb) under OpLog. Returns (op list of the first step,
    problems): each broken rule, and the first op or shape that differs between two steps."""
    dev = hf.model.embed_tokens.weight.device
    # vocab < the embedding's rows: the step also masks the rows past the tokenizer, as for real checkpoints
    dec = engine.Decoder(hf, rows=Bb, capacity=2 * Lb, temperature=temperature, top_p=top_p, seed=0, graphs=False,
                         vocab=hf.config.vocab_size - 3)
    if dev.type != "meta":  # rows at different lengths, as after a refill
        dec.lens.copy_(torch.arange(Bb, device=dev) * 3 % (Lb // 2) + 1)
        dec.tok.copy_(torch.arange(Bb, device=dev) * 7 % hf.config.vocab_size)
        dec.row.copy_(torch.arange(Bb, device=dev))
    hist_tok = torch.zeros(Bb, steps, dtype=torch.long, device=dev)
    hist_logp = torch.zeros(Bb, steps, dtype=torch.float32, device=dev)
    hist_kept = torch.zeros(Bb, steps, dtype=torch.float32, device=dev)
    logs, problems = [], []
    for _ in range(steps):
        log = OpLog(dev)
        try:
            with log:
                dec.step(Bb, Lb, hist_tok, hist_logp, hist_kept)
        except Exception as e:  # noqa: BLE001
            if not log.problems:
                log.problems.append(f"the step raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        problems += [p for p in log.problems if p not in problems]
        logs.append(log.ops)
    for i, (a, b) in enumerate(zip(logs[0], logs[-1])):
        if a != b:
            problems.append(f"op {i} differs between steps: {a} then {b}")
            break
    else:
        if len(logs[0]) != len(logs[-1]):
            problems.append(f"{len(logs[0])} ops at the first step, {len(logs[-1])} at the last")
    return logs[0], problems


SAMPLERS = ((0.0, 1.0), (1.0, 1.0), (0.7, 0.9))  # (temperature, top_p): greedy, full softmax, nucleus


def main():
    p = flags.parser(__doc__)
    p.add_argument("--device", default=None, help="cpu, meta or cuda (default: cpu and meta, or cuda when present)")
    p.add_argument("--ops", action="store_true", help="print the op list of one decode step (qwen2, nucleus sampling)")
    args = p.parse_args()
    devices = [args.device] if args.device else (["cuda"] if torch.cuda.is_available() else ["cpu", "meta"])
    dtype = torch.bfloat16 if "cuda" in devices else torch.float32
    bad = 0
    for dev in devices:
        for family in ("qwen2", "qwen3", "llama"):
            for temperature, top_p in SAMPLERS:
                ops, problems = audit(tiny_model(family, dev, dtype), temperature=temperature, top_p=top_p)
                bad += bool(problems)
                print(f"{dev:<5} {family:<6} temperature {temperature} top_p {top_p}: {len(ops)} ops, "
                      + ("capture-safe" if not problems else "NOT capture-safe:\n  " + "\n  ".join(problems)))
    if args.ops:
        ops, _ = audit(tiny_model("qwen2", devices[0], dtype, layers=1), temperature=0.7, top_p=0.9)
        print("\nop list of one decode step (qwen2, 1 layer, Bb=4, Lb=32, temperature 0.7, top_p 0.9), "
              f"{len(ops)} ops:")
        for op, ins, outs in ops:
            print(f"  {op:<45} {' '.join(map(str, ins)):<60} -> {' '.join(map(str, outs))}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
