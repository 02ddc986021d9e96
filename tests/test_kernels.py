"""kernels/logprobs.py against float64 PyTorch: values, gradients, odd shapes, -inf and peaked rows.

On CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1); on a CUDA
machine every test also runs on the GPU. Inputs are fresh random numbers each run: the seed is
printed (shown on failure); set KERNEL_TEST_SEED to replay one.
"""
import math
import os
import random
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels.logprobs as K
from kernels import lm_head_logprobs_and_entropy, logprobs_and_entropy, logprobs_and_entropy_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
FUNCS = {"kernel": logprobs_and_entropy, "reference": logprobs_and_entropy_reference}


@pytest.fixture(autouse=True)
def seed():
    s = int(os.environ.get("KERNEL_TEST_SEED", random.randrange(2**31)))
    print(f"KERNEL_TEST_SEED={s}")
    torch.manual_seed(s)
    return s


def ref64(x, y, T):
    """float64 logp_y and entropy, straight from the definitions."""
    logp_all = torch.log_softmax(x.double() / T, dim=-1)           # (N, V)
    p = logp_all.exp()
    H = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)           # (N,)
    return logp_all.gather(1, y[:, None].clamp_min(0)).squeeze(1), H


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def make_inputs(N, V, dtype, device):
    """Random rows, plus (when N >= 3) a row with -inf entries and a peaked row far from 0."""
    x = torch.randn(N, V, device=device) * 3                       # (N, V)
    y = torch.randint(0, V, (N,), device=device)                   # (N,)
    if N >= 3:
        x[0, torch.rand(V, device=device) < 0.3] = float("-inf")
        x[0, y[0]] = 1.0                                           # the target itself is finite
        x[1] += 200.0                                              # e^z overflows without the shift
        x[1, V // 2] += 30.0                                       # one logit 30 above the rest
    return x.to(dtype), y


def check_against_float64(fn, x, y, T):
    """Values and gradients (random upstream grads into BOTH outputs) vs float64 autograd."""
    tol = TOL[x.dtype]
    xa = x.clone().requires_grad_(True)
    logp, H = fn(xa, y, T)
    assert logp.dtype == H.dtype == torch.float32 and logp.shape == H.shape == y.shape
    g, h = torch.randn_like(logp), torch.randn_like(H)
    g0, h0 = g.clone(), h.clone()
    torch.autograd.backward([logp, H], [g, h])
    assert torch.equal(g, g0) and torch.equal(h, h0), "upstream gradients modified in place"
    assert xa.grad.dtype == x.dtype and xa.grad.shape == x.shape

    xd = x.double().requires_grad_(True)
    rlogp, rH = ref64(xd, y, T)
    torch.autograd.backward([rlogp, rH], [g.double(), h.double()])
    assert rel(logp, rlogp) < tol, rel(logp, rlogp)
    assert rel(H, rH) < tol, rel(H, rH)
    assert rel(xa.grad, xd.grad) < tol, rel(xa.grad, xd.grad)
    assert torch.isfinite(xa.grad).all()
    return logp, H, rlogp, rH


# -----------------------------------------------------------------------------

def test_hand_computed():
    x = torch.tensor([[0.0, 0.0], [0.0, float("-inf")], [2.0, 2.0]], requires_grad=True)
    y = torch.tensor([1, 0, 0])
    logp, H = logprobs_and_entropy(x, y)
    torch.testing.assert_close(logp, torch.tensor([-math.log(2), 0.0, -math.log(2)]))
    torch.testing.assert_close(H, torch.tensor([math.log(2), 0.0, math.log(2)]))
    (logp * torch.tensor([1.0, 1.0, 2.0])).sum().backward()       # d logp_y / dz = onehot - p
    torch.testing.assert_close(x.grad, torch.tensor([[-0.5, 0.5], [0.0, 0.0], [1.0, -1.0]]))
    x.grad = None
    logprobs_and_entropy(x, y)[1].sum().backward()                # H is flat at the uniform p
    torch.testing.assert_close(x.grad, torch.zeros(3, 2))


def test_triton_path_is_tested():
    assert torch.cuda.is_available() or K.INTERPRET, "CPU tests must run the Triton interpreter"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(FUNCS))
@pytest.mark.parametrize("N,V,T,dtype", [
    (3, 41, 1.0, torch.float32),
    (3, 41, 0.6, torch.float32),
    (7, 1000, 0.6, torch.float32),
    (4, 50257, 1.0, torch.float32),
    (3, 151936, 0.6, torch.float32),
    (5, 3001, 0.6, torch.bfloat16),
    (3, 151936, 1.0, torch.bfloat16),
    (4, 777, 1.0, torch.float16),
])
def test_matches_float64(device, impl, N, V, T, dtype):
    x, y = make_inputs(N, V, dtype, device)
    logp, H, rlogp, rH = check_against_float64(FUNCS[impl], x, y, T)
    # the peaked row stays accurate in absolute terms too (its entropy is ~1e-11)
    assert abs(H[1].item() - rH[1].item()) < 1e-6 and abs(logp[1].item() - rlogp[1].item()) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_batched_inputs(device):
    N, V = 6, 300
    wide = torch.randn(N, V + 13, device=device)
    x = wide[:, 5:5 + V]                                           # row stride V + 13
    y = torch.randint(0, V, (N,), device=device)
    check_against_float64(logprobs_and_entropy, x, y, 0.6)
    xt = torch.randn(V, N, device=device).T                        # stride along V != 1
    check_against_float64(logprobs_and_entropy, xt, y, 1.0)
    logp, H = logprobs_and_entropy(x.reshape(2, 3, V), y.reshape(2, 3))   # (B, T, V) in, (B, T) out
    torch.testing.assert_close(logp, logprobs_and_entropy(x, y)[0].reshape(2, 3))
    assert H.shape == (2, 3)


def test_cpu_fallback_without_interpreter(monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors take the PyTorch reference, in both public functions."""
    monkeypatch.setattr(K, "INTERPRET", False)
    x, y = make_inputs(6, 333, torch.float32, "cpu")
    check_against_float64(logprobs_and_entropy, x, y, 0.6)
    logp, H = logprobs_and_entropy(x.reshape(2, 3, 333), y.reshape(2, 3))
    assert logp.shape == H.shape == (2, 3)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    W = torch.randn(333, 8, requires_grad=True)
    y = torch.randint(0, 333, (2, 5))
    logp, H = lm_head_logprobs_and_entropy(hidden, W, y, 0.6, chunk_tokens=3)
    (logp.sum() + H.sum()).backward()
    hd, Wd = (t.detach().double().requires_grad_(True) for t in (hidden, W))
    rlogp, rH = ref64(hd.reshape(10, 8) @ Wd.T, y.reshape(10), 0.6)
    (rlogp.sum() + rH.sum()).backward()
    assert rel(logp.reshape(10), rlogp) < 1e-5 and rel(H.reshape(10), rH) < 1e-5
    assert rel(hidden.grad, hd.grad) < 1e-5 and rel(W.grad, Wd.grad) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_one_output_and_ignore_index(device):
    N, V = 5, 100
    x = torch.randn(N, V, device=device, requires_grad=True)
    y = torch.randint(0, V, (N,), device=device)
    y[2] = -100                                                    # read as 0; the caller masks
    logp, H = logprobs_and_entropy(x, y)
    rlogp, rH = ref64(x.detach(), y, 1.0)
    assert rel(logp, rlogp) < 1e-5 and rel(H, rH) < 1e-5
    logp.sum().backward()                                          # no grad for H; expanded g
    xd = x.detach().double().requires_grad_(True)
    ref64(xd, y, 1.0)[0].sum().backward()
    assert rel(x.grad, xd.grad) < 1e-5
    x.grad, xd.grad = None, None
    logprobs_and_entropy(x, y)[1].mean().backward()                # only the entropy
    ref64(xd, y, 1.0)[1].mean().backward()
    assert rel(x.grad, xd.grad) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_through_preceding_matmul(device, dtype):
    """hidden @ W.T -> kernel: the matmul's backward consumes the kernel's gradient, so an
    in-place write into a tensor autograd still needs would show up in d(hidden), d(W)."""
    N, D, V = 9, 24, 517
    hidden = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    W = torch.randn(V, D, device=device, dtype=dtype, requires_grad=True)
    y = torch.randint(0, V, (N,), device=device)
    logp, H = logprobs_and_entropy(hidden @ W.T, y, 0.6)
    g, h = torch.randn(N, device=device), torch.randn(N, device=device)
    (logp * g + H * h).sum().backward()
    hd, Wd = (t.detach().double().requires_grad_(True) for t in (hidden, W))
    rlogp, rH = ref64(hd @ Wd.T, y, 0.6)
    (rlogp * g.double() + rH * h.double()).sum().backward()
    tol = TOL[dtype] if dtype == torch.float32 else 3e-2            # + bf16 matmul rounding
    assert hidden.grad.dtype == W.grad.dtype == dtype
    assert rel(logp, rlogp) < tol and rel(H, rH) < tol
    assert rel(hidden.grad, hd.grad) < tol and rel(W.grad, Wd.grad) < tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1.0, 0.6])
def test_lm_head_fused(device, T):
    N, D, V, C = 30, 16, 1003, 7                                   # C < N, C does not divide N
    hidden = torch.randn(N, D, device=device, requires_grad=True)
    W = torch.randn(V, D, device=device, requires_grad=True)
    y = torch.randint(0, V, (N,), device=device)
    y[4] = -100
    logp, H = lm_head_logprobs_and_entropy(hidden, W, y, T, chunk_tokens=C)
    g, h = torch.randn(N, device=device), torch.randn(N, device=device)
    torch.autograd.backward([logp, H], [g, h])
    hd, Wd = (t.detach().double().requires_grad_(True) for t in (hidden, W))
    rlogp, rH = ref64(hd @ Wd.T, y, T)
    torch.autograd.backward([rlogp, rH], [g.double(), h.double()])
    for out, ref in [(logp, rlogp), (H, rH), (hidden.grad, hd.grad), (W.grad, Wd.grad)]:
        assert rel(out, ref) < 1e-5, rel(out, ref)
    # a frozen lm_head (no weight grad) and (B, T, D) hidden states
    hidden.grad = None
    logp2, _ = lm_head_logprobs_and_entropy(hidden.reshape(3, 10, D), W.detach(), y.reshape(3, 10),
                                            T, chunk_tokens=4)
    (logp2.reshape(-1) * g).sum().backward()
    assert logp2.shape == (3, 10) and rel(logp2.reshape(-1), rlogp) < 1e-5
    hd.grad = None
    (ref64(hd @ Wd.T, y, T)[0] * g.double()).sum().backward()
    assert rel(hidden.grad, hd.grad) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_lm_head_fused_under_autocast(device):
    """One process trains fp32 master weights under bf16 autocast: hidden arrives in bf16, the weight
    in fp32. Values and both gradients (in the inputs' own dtypes) against float64 from the same
    bf16-rounded logits (the matmul's output rounding is autocast's, not the kernel's; a
    straight-through term keeps the float64 gradient path), at the bf16 tolerance."""
    N, D, V, C = 24, 16, 517, 10
    W = torch.randn(V, D, device=device, requires_grad=True)                 # fp32 master weight
    hidden = torch.randn(N, D, device=device).bfloat16().requires_grad_(True)
    y = torch.randint(0, V, (N,), device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        logp, H = lm_head_logprobs_and_entropy(hidden, W, y, 0.6, chunk_tokens=C)
    g, h = torch.randn(N, device=device), torch.randn(N, device=device)
    torch.autograd.backward([logp, H], [g, h])
    assert W.grad.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    hd, Wd = (t.detach().double().requires_grad_(True) for t in (hidden, W.bfloat16()))
    z = hd @ Wd.T                                                            # (N, V) float64
    z = z + (z.bfloat16().double() - z).detach()                             # bf16 values, float64 grads
    rlogp, rH = ref64(z, y, 0.6)
    torch.autograd.backward([rlogp, rH], [g.double(), h.double()])
    for out, ref in [(logp, rlogp), (H, rH), (hidden.grad, hd.grad), (W.grad, Wd.grad)]:
        assert rel(out, ref) < 1e-2, rel(out, ref)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active (every aten op's fresh outputs,
    freed when their storage dies). Exact, deterministic, any device, no allocator noise."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()
        self.fresh = []                                            # (dtype, shape) of each fresh tensor

    def _free(self, ptr, nbytes):
        self.live -= nbytes
        self.seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr and ptr not in inputs and ptr not in self.seen:   # views, in-place: not fresh
                self.seen.add(ptr)
                self.fresh.append((t.dtype, tuple(t.shape)))
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, ptr, st.nbytes())
        return out


def peak_tensor_bytes(fn):
    with PeakTensorMemory() as mem:
        fn()
    return mem.peak


@pytest.fixture
def one_thread():
    """Big CPU ops on a shared 2-core box: one thread avoids OpenMP oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_reference_memory_is_bounded(one_thread):
    """The chunked reference never holds a float32 (N, V) tensor: its peak extra memory is a
    small fraction of N·V·4 bytes (plain log_softmax(logits.float()) peaks at 2·N·V·4)."""
    N, V = 4096, 32000
    x = torch.randn(N, V, dtype=torch.bfloat16)                    # (N, V) 250 MiB
    y = torch.randint(0, V, (N,))
    full = N * V * 4
    assert peak_tensor_bytes(lambda: torch.log_softmax(x.float() / 0.6, -1)) >= 2 * full  # the probe sees it
    fwd = peak_tensor_bytes(lambda: logprobs_and_entropy_reference(x, y, 0.6))
    print(f"reference forward: peak extra {fwd / 2**20:.0f} MiB vs N*V*4 = {full / 2**20:.0f} MiB")
    assert fwd < full / 16
    # fwd+bwd on 2048 rows: d(logits) itself (bf16), plus float32 temporaries for one chunk of rows
    xs = x[:2048].clone().requires_grad_(True)
    def fwd_bwd():
        logp, H = logprobs_and_entropy_reference(xs, y[:2048], 0.6)
        (logp.sum() + H.sum()).backward()
    both = peak_tensor_bytes(fwd_bwd) - xs.numel() * 2
    print(f"reference fwd+bwd: peak extra beyond d(logits) {both / 2**20:.0f} MiB "
          f"vs N*V*4 = {xs.numel() * 4 / 2**20:.0f} MiB")
    assert both < xs.numel() * 4 / 4



@pytest.mark.parametrize("device", DEVICES)
def test_lm_head_backward_recomputes_the_forward_logits(device, monkeypatch):
    """A Qwen3 with fp32 master weights under bf16 autocast hands the head an FP32 hidden state (its
    residual stream is fp32); here the lm_head weight is bf16. The forward's logits are bf16 (autocast),
    so the backward must recompute exactly those bf16 logits: p = exp(z - m - log d) then comes from the
    same z as the saved max and log-sum, and every gradient row sums to 0 up to the rounding of its bf16
    entries, |Σ_v dz_v| <= (2^-8 + V·2^-24) Σ_v |dz_v| (bf16 unit roundoff 2^-8; fp32 sums). Logits
    recomputed in fp32 meet the bf16 forward's max and log-sum and miss that bound. And no float32 tensor
    as large as a chunk of logits (C·V elements) is ever allocated, forward or backward."""
    N, D, V, C, T = 12, 16, 389, 5, 0.6
    hidden = torch.randn(N, D, device=device, requires_grad=True)               # fp32 hidden state
    W = (torch.randn(V, D, device=device) * 2).bfloat16().requires_grad_(True)   # bf16 lm_head, logits ~ N(0, 8²)
    y = torch.randint(0, V, (N,), device=device)
    g, h = torch.randn(N, device=device), torch.randn(N, device=device)
    rows = []                                                                    # (Σ dz, Σ |dz|) per row, float64
    backward_rows = K._backward_rows

    def spy(*a, **kw):
        dz = backward_rows(*a, **kw)                                             # (C, V) d(logits) of a chunk
        rows.append((dz.double().sum(1), dz.double().abs().sum(1)))
        return dz

    monkeypatch.setattr(K, "_backward_rows", spy)
    with PeakTensorMemory() as mem:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            logp, H = lm_head_logprobs_and_entropy(hidden, W, y, T, chunk_tokens=C)
        torch.autograd.backward([logp, H], [g, h])
    assert hidden.grad.dtype == torch.float32 and W.grad.dtype == torch.bfloat16
    big = [(dt, s) for dt, s in mem.fresh if dt == torch.float32 and math.prod(s) >= C * V]
    assert not big, f"float32 tensors the size of a chunk of logits: {big}"
    assert len(rows) == math.ceil(N / C)
    s, a = (torch.cat(x) for x in zip(*rows))                                     # (N,), (N,)
    bound = (2 ** -8 + V * 2 ** -24) * a
    assert (s.abs() <= bound).all(), (s.abs() / a).max().item()
    # and the values are those of the bf16 logits (as in test_lm_head_fused_under_autocast)
    z = hidden.detach().double().bfloat16().double() @ W.detach().double().T     # autocast rounds both inputs
    rlogp, rH = ref64(z.bfloat16().double(), y, T)
    assert rel(logp, rlogp) < 1e-2 and rel(H, rH) < 1e-2


def test_lm_head_cpu_path_keeps_the_row_budget(one_thread, monkeypatch):
    """On CPU without the interpreter the fused lm_head op runs the PyTorch reference, whose float32
    temporaries are per row: a chunk of tokens is capped at the reference's row budget (2^20 / V rows,
    ~4 MiB per float32 temporary). So the peak extra memory does not grow with N beyond the O(N)
    outputs (24 bytes a token) and the gradients themselves; uncapped it grows ~N·V·4·7 bytes."""
    monkeypatch.setattr(K, "INTERPRET", False)
    D, V = 16, 8192
    W = torch.randn(V, D, requires_grad=True)

    def peaks(N):
        hidden = torch.randn(N, D, requires_grad=True)
        y = torch.randint(0, V, (N,))
        fwd = peak_tensor_bytes(lambda: lm_head_logprobs_and_entropy(hidden, W, y, 0.6))
        def fwd_bwd():
            logp, H = lm_head_logprobs_and_entropy(hidden, W, y, 0.6)
            (logp.sum() + H.sum()).backward()
        both = peak_tensor_bytes(fwd_bwd) - (hidden.numel() + W.numel()) * 4   # minus d(hidden), d(W)
        return fwd, both, hidden, y

    small, large = peaks(512), peaks(2048)
    print(f"lm_head CPU path: peak extra forward {small[0] / 2**20:.1f} MiB at N=512, {large[0] / 2**20:.1f} MiB "
          f"at N=2048; fwd+bwd {small[1] / 2**20:.1f} / {large[1] / 2**20:.1f} MiB (N*V*4 = {2048 * V * 4 / 2**20:.0f} MiB)")
    outputs = (2048 - 512) * (4 * 4 + 8)        # a token: logp, H, m, log d (float32), its target (int64)
    assert large[0] - small[0] <= outputs and large[1] - small[1] <= outputs, (large[0] - small[0], large[1] - small[1])
    hidden, y = large[2], large[3]
    rlogp, rH = ref64(hidden.detach().double() @ W.detach().double().T, y, 0.6)
    logp, H = lm_head_logprobs_and_entropy(hidden, W, y, 0.6)
    assert rel(logp, rlogp) < 1e-5 and rel(H, rH) < 1e-5

FSDP2_CHECK = '''
import sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, ".")
from kernels import lm_head_logprobs_and_entropy

class Head(torch.nn.Module):
    """The fused op called inside an FSDP-managed module's forward: the weight is unsharded."""
    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(16, 301, bias=False)

    def forward(self, hidden, y):
        return lm_head_logprobs_and_entropy(hidden, self.lm_head.weight, y, 0.6, chunk_tokens=5)

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = Head()

    def forward(self, hidden, y):
        return self.head(hidden, y)

dist.init_process_group("gloo")
torch.manual_seed(0)                                    # same weights and inputs on every rank
ref, model = Head(), Model()
model.head.load_state_dict(ref.state_dict())
fully_shard(model.head, reshard_after_forward=True)     # freed after forward, re-gathered for backward
fully_shard(model)
hidden, y = torch.randn(12, 16), torch.randint(0, 301, (12,))
grads = []
for m in (model, ref):
    h = hidden.clone().requires_grad_(True)
    logp, H = m(h, y)
    if m is model:
        assert type(model.head.lm_head.weight).__name__ == "DTensor"   # resharded before backward
    (logp.sum() + 0.5 * H.sum()).backward()
    grads.append(h.grad)
# FSDP2 averages the gradient over ranks: identical inputs give the single-process gradient
dw = model.head.lm_head.weight.grad.full_tensor()
err = ((dw - ref.lm_head.weight.grad).norm() / ref.lm_head.weight.grad.norm()).item()
assert err < 1e-5 and torch.allclose(grads[0], grads[1], atol=1e-6), err
if dist.get_rank() == 0:
    print("FSDP2 OK", err)
dist.barrier()                  # as cli.finish: a rank tearing its gloo group down while the other still
dist.destroy_process_group()    # talks to it aborts ("terminate called without an active exception")
'''


def test_lm_head_under_fsdp2(tmp_path):
    """The fused lm_head op inside an FSDP2 (fully_shard) module, 2 gloo ranks on CPU."""
    from conftest import run_cli, torchrun
    script = tmp_path / "fsdp2_lm_head.py"
    script.write_text(FSDP2_CHECK)
    p = run_cli(torchrun(2) + [str(script)], env={"TRITON_INTERPRET": "1"})
    assert "FSDP2 OK" in p.stdout
