"""
The machine a run is on: its device, the dtype that is fastest there (measured, never assumed),
the peak FLOP/s an MFU is taken against, and memory. Used by train.py, eval.py, bench.py,
teacher.py --cache and the data preparation.

CPUs differ. With AVX-512 bf16 and AMX a bf16 matmul runs about 4x faster than float32; with
AVX2 alone oneDNN emulates bf16 and it runs 7x to 200x slower. So dtype='auto' times both on a
matmul of the model's own shape (well under a second) and takes bf16 only where it is faster:

    device = pick_device('auto')                                # 'cuda' if a GPU is visible, else 'cpu'
    dtype, line = choose_dtype('auto', device, width=384)       # 'float32' | 'bfloat16' | 'float16', and why
    peak = Peak(*peak_flops(device, dtype))                     # measured on CPU, looked up per GPU
    mfu, note = peak.mfu(flops_per_second)                      # never above 1: a faster step raises the peak

On CUDA, 'auto' is bf16 where the GPU has it, else float16 (train.py then scales the loss with a GradScaler).
"""
import ctypes
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F

DTYPES = ('auto', 'bfloat16', 'float16', 'float32')
TORCH_DTYPE = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
GPU_PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12, 'RTX 4090': 165e12}


def pick_device(device):
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; an explicit CUDA device must exist."""
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit(f"indra: --device={device} but no CUDA GPU is visible; use --device=cpu (or auto)")
    return device


def start_ranks(device):
    """(device, rank, world_size) of this process. Under torchrun (it sets RANK, LOCAL_RANK and WORLD_SIZE):
    one GPU per rank, the process group started (NCCL between GPUs, gloo between CPU processes), and the output
    of every rank but 0 silenced (errors still reach stderr). Otherwise (device, 0, 1)."""
    if 'RANK' not in os.environ:
        return device, 0, 1
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if rank:
        sys.stdout = open(os.devnull, 'w')
    return device, rank, world_size


def seed_all(seed):
    """Seed every generator a run draws from outside its own: torch's (init, dropout), Python's and NumPy's."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def all_sum(t):
    """A CPU tensor summed over all ranks (itself in a single process); NCCL reduces on the GPU only."""
    if not dist.is_initialized():
        return t
    device = f'cuda:{torch.cuda.current_device()}' if dist.get_backend() == 'nccl' else 'cpu'
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def autocast(device, dtype):
    """The autocast context for a dtype name: none for float32."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type='cuda' if str(device).startswith('cuda') else 'cpu', dtype=TORCH_DTYPE[dtype])


def probe(width, budget=0.2):
    """Seconds per (rows, width) @ (width, 4 width) product, the shape of the model's MLP, in float32 and under
    bf16 autocast (as training runs it: float32 weights cast on the fly). rows: up to 256 tokens, fewer for wide
    models (at most ~0.27 GFLOP a product); with fewer than ~128 rows this CPU's bf16 penalty shows smaller than it
    is (4x at 16 rows, 6-9x from 128). Each dtype: a warm-up call, then the best of up to 4 timings, taken in turn
    (float32, bf16, float32, ...) so that a moment of load from another process slows both alike, each timing
    repeating the product until it lasts a millisecond (a tiny model's product takes ~0.05 ms, within the
    clock's noise), stopping once `budget` seconds are spent, so the probe stays well under a second."""
    rows = max(16, min(256, 2 ** 28 // (8 * width * width)))
    gen = torch.Generator().manual_seed(0)  # the caller's RNG is untouched
    x, w = torch.randn(rows, width, generator=gen), torch.randn(4 * width, width, generator=gen)

    def seconds(name, reps):
        t0 = time.perf_counter()
        with autocast('cpu', name):
            for _ in range(reps):
                F.linear(x, w)
        return (time.perf_counter() - t0) / reps

    names = ('float32', 'bfloat16')
    for name in names:
        seconds(name, 1)  # warm-up: the first call pays for allocation and the thread pool
    best = {name: seconds(name, 1) for name in names}
    reps = {name: max(1, math.ceil(1e-3 / best[name])) for name in names}
    spent = 2 * sum(best.values())
    for _ in range(3):
        for name in names:
            if spent < budget:
                t = seconds(name, reps[name])
                best[name], spent = min(best[name], t), spent + t * reps[name]
    return {'rows': rows, 'width': width, **best}


def choose_dtype(requested, device, width, saved=None, timings=None):
    """(dtype name, one line saying why) for the settings' dtype on device. requested 'auto' with a saved dtype
    (a resumed run) keeps the saved one; otherwise 'auto' is measured on CPU (probe, or the timings it returned
    already) and looked up on CUDA. An explicit dtype is honoured; on CPU bfloat16 is still probed, to say what it
    costs."""
    if requested not in DTYPES:
        raise SystemExit(f"indra: --dtype={requested!r}: choose auto (measured), bfloat16, float16 or float32")
    how = 'as asked'
    if requested == 'auto' and saved:
        requested, how = saved, 'as the checkpoint was trained (--dtype=auto measures again only for a new run)'
    if str(device).startswith('cuda'):
        has_bf16 = torch.cuda.is_bf16_supported()
        if requested == 'auto':
            name = 'bfloat16' if has_bf16 else 'float16'
            why = 'this GPU has bf16' if has_bf16 else 'no bf16 on this GPU: float16 with a GradScaler'
            return name, f"dtype auto: {name} ({why})"
        if requested == 'bfloat16' and not has_bf16:
            raise SystemExit("indra: this GPU has no bfloat16; use --dtype=auto or --dtype=float16")
        return requested, f"dtype {requested}, {how}"
    if requested == 'float16':
        raise SystemExit("indra: --dtype=float16 is for CUDA (CPU autocast runs bfloat16); on CPU use --dtype=auto, "
                         "bfloat16 or float32")
    if requested == 'float32':
        return 'float32', f"dtype float32, {how}"
    t = timings or probe(width)
    timing = (f"a ({t['rows']} x {width}) @ ({width} x {4 * width}) matmul took {t['float32'] * 1e3:.2f} ms in "
              f"float32, {t['bfloat16'] * 1e3:.2f} ms under bf16 autocast")
    if requested == 'bfloat16':
        ratio = t['bfloat16'] / t['float32']
        cost = f"{ratio:.1f}x slower than" if ratio > 1 else f"{1 / ratio:.1f}x faster than"
        return 'bfloat16', (f"dtype bfloat16, {how}: on this CPU it is {cost} float32 ({timing})"
                            + ("; --dtype=auto would pick float32" if ratio > 1 else ""))
    # bf16 only where it is clearly faster: within 10% the two are within the probe's noise, and float32 is the more exact
    name = 'bfloat16' if t['bfloat16'] < t['float32'] / 1.1 else 'float32'
    why = 'the faster on this CPU' if name == 'bfloat16' or t['float32'] < t['bfloat16'] else \
        'as fast as bf16 here within 10%, and more exact'
    return name, f"dtype auto: {name}, {why} ({timing})"


def run_dtype(requested, device, width, saved, master, ddp):
    """choose_dtype for a run, once: rank 0 measures (width() gives the width the probe runs at) and every
    rank takes its choice; saved: the dtype of the checkpoint a run resumes (kept with 'auto'), or None."""
    choice = list(choose_dtype(requested, device, width(), saved=saved)) if master else [None, None]
    if ddp:
        dist.broadcast_object_list(choice, src=0)
    return tuple(choice)


def compiled(module, batch, autocast):
    """torch.compile module now, on a real batch (a data.Batch), so that the first timed step is not the
    compilation; where it cannot compile (no C++ compiler, an unsupported platform), say so in one line and
    return module as it is. The RNG is left as it was (dropout draws from it)."""
    print("compiling the student (torch.compile; a minute or so on a CPU)")
    try:
        fast = torch.compile(module)
        with torch.random.fork_rng(), autocast:
            fast(batch.x, batch.attention_mask).sum().backward()
        module.zero_grad(set_to_none=True)
        return fast
    except Exception as e:
        print(f"indra: torch.compile is unavailable here ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]}); running the student uncompiled")
        return module


def peak_flops(device, dtype, seconds=1.0):
    """(FLOP/s, where it came from), or (None, why not): looked up per GPU; on CPU the best rate of square
    matmuls in dtype (a name or a torch dtype). The size doubles from 128 while one product takes under a
    twentieth of `seconds` (up to 4096), then products of that size repeat until `seconds` are spent: about a
    second wherever the dtype is slow (a fixed 4096^3 bf16 product alone takes minutes without bf16 instructions),
    and the best of several timings, so that the peak is not one slow moment of a machine whose speed drifts."""
    dtype = TORCH_DTYPE.get(dtype, dtype)
    if str(device).startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)  # dense fp16 = dense bf16 on these
        if peak and dtype == torch.float32:
            return None, f"{name} in float32: no peak in the table, MFU not reported"
        return (peak, f"{name}, looked up") if peak else (None, f"{name} is not in the table, MFU not reported")
    n, spent, best, products = 128, 0.0, 0.0, 0
    gen = torch.Generator().manual_seed(0)  # the caller's RNG is untouched
    a = torch.randn(n, n, generator=gen).to(dtype)
    while True:
        t0 = time.perf_counter()
        torch.mm(a, a)
        dt = time.perf_counter() - t0
        spent, best, products = spent + dt, max(best, 2 * n ** 3 / dt), products + 1
        if dt < seconds / 20 and n < 4096:
            n *= 2
            a = torch.randn(n, n, generator=gen).to(dtype)
        elif spent >= seconds:
            break
    return best, f"the best of {products} square {str(dtype)[6:]} matmuls up to {n}^3 on this machine"


class Peak:
    """The FLOP/s an MFU is taken against. A measured CPU peak can be beaten by a step (the machine's speed drifts),
    and an MFU above 100% is a wrong peak, never a result: mfu() then raises the peak to what the step achieved
    and says so in one line."""

    def __init__(self, flops, source):
        self.flops, self.source = flops, source

    def mfu(self, achieved):
        """(achieved / peak, or None without a peak; a line when the peak was raised, else None)."""
        if not self.flops:
            return None, None
        note = None
        if achieved > self.flops:
            note = (f"MFU peak raised from {self.flops / 1e12:.3f} to {achieved / 1e12:.3f} TFLOP/s: a step ran "
                    f"faster than {self.source}")
            self.flops, self.source = achieved, 'the fastest step so far'
        return achieved / self.flops, note

    def line(self, student_flops, teacher_flops):
        """The FLOPs per token of a step (student forward and backward, teacher forward) and this peak."""
        peak = '%.3f TFLOP/s' % (self.flops / 1e12) if self.flops else 'no peak'
        return (f"FLOPs per token: student {student_flops / 1e6:.1f}M (fwd+bwd) + teacher "
                f"{teacher_flops / 1e6:.1f}M (fwd); MFU against {peak}: {self.source}")


def memory(device_type):
    """What the process really holds: on CUDA the device's used/total (seed 002: allocated alone hid the
    rest) and PyTorch's allocated/reserved; on CPU the resident set."""
    if device_type == 'cuda':
        free, total = torch.cuda.mem_get_info()
        return {'gpu_used_gib': (total - free) / 2**30, 'gpu_total_gib': total / 2**30,
                'gpu_allocated_gib': torch.cuda.memory_allocated() / 2**30,
                'gpu_reserved_gib': torch.cuda.memory_reserved() / 2**30}
    return {'rss_gib': psutil.Process().memory_info().rss / 2**30}


def memory_text(m):
    if 'gpu_used_gib' in m:
        return (f"gpu {m['gpu_used_gib']:.1f}/{m['gpu_total_gib']:.1f} GiB (allocated {m['gpu_allocated_gib']:.1f}, "
                f"reserved {m['gpu_reserved_gib']:.1f})")
    return f"rss {m['rss_gib']:.2f} GiB"


class FreedMemory:
    """CPU training: keep freed memory in the process for the next step instead of giving it back to the OS.
    glibc maps every tensor over 32 MB (logits chunks, the embedding's gradient) on fresh pages and unmaps them when
    the tensor is freed, so each step page-faults them in again: ~240,000 faults and ~0.4 s of kernel time per
    quickstart step on a 2-core machine. With mmap off and no trimming, large tensors come from the heap and
    reuse what the last step freed (0 faults); the resident size then stays at its high-water mark, as a GPU's
    caching allocator does. That holds while every step makes the same tensors. When their shapes change from
    step to step (batches of examples padded to their longest, on-policy answers) the heap fragments and grows:
    config/agent_cpu_pruned.py went from 4.6 GiB resident at step 0 to 18.5 GiB at step 120 on a 24 GiB machine,
    and glibc's own allocator, which held 2 GiB, took twice as long a step (7-13 s against 3.5-4 s, page faults).
    So trim(rss) gives the free pages back (malloc_trim) whenever the resident set is past twice what it was after
    the first step: one slow step now and then instead of every one. line: what was done, in one line."""

    def __init__(self):
        self.libc, self.limit = None, None
        try:
            libc = ctypes.CDLL('libc.so.6')
            M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameter numbers in glibc's malloc.h
            if libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1):
                self.libc = libc
        except (OSError, AttributeError):
            pass
        self.line = ("cpu memory: freed tensors stay in the process for reuse (glibc mallopt: no mmap, no trim), "
                     "given back when it holds twice its first step's" if self.libc else
                     "cpu memory: no glibc mallopt here (or it refused), so freed tensors go back to the OS and are "
                     "page-faulted in again each step")

    def trim(self, rss_gib):
        """After an optimizer step, with the process's resident GiB: give the free pages back past the limit."""
        if self.libc is None:
            return
        if self.limit is None:
            self.limit = 2 * rss_gib
        elif rss_gib > self.limit:
            self.libc.malloc_trim(0)
