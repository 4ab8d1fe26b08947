"""
Seeing what training does: memory, throughput and MFU for every log line, repetition statistics
that catch a collapsing student, and the run's records (out/log.jsonl always; Weights & Biases
and Aim when switched on). Used by train.py and bench.py; plot.py draws the records.

    rec = Records(out_dir, config, wandb_log=True, wandb_mode='offline')
    rec.log({'iter': 10, 'loss': 3.2})
    repetition(ids)  ->  {'distinct_1': .., 'distinct_2': .., 'top_share': ..}

MFU counts FLOPs with the PaLM formula (Chowdhery et al. 2022, appendix B): 6N + 12 L T C per
trained token and 2N + 4 L T C per teacher token (forward only), N the parameters that take part
in matmuls (a tied head once, an embedding lookup not), against a peak measured on this machine
(a large matmul in the training dtype) on CPU or looked up for the GPU (dense, no sparsity).
"""
import ctypes
import importlib
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import psutil
import torch

GPU_PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12, 'RTX 4090': 165e12}


def memory(device_type):
    """What the process really holds: on CUDA the device's used/total (seed 002: allocated alone hid the
    rest) and PyTorch's allocated/reserved; on CPU the resident set."""
    if device_type == 'cuda':
        free, total = torch.cuda.mem_get_info()
        return {'gpu_used_gib': (total - free) / 2**30, 'gpu_total_gib': total / 2**30,
                'gpu_allocated_gib': torch.cuda.memory_allocated() / 2**30,
                'gpu_reserved_gib': torch.cuda.memory_reserved() / 2**30}
    return {'rss_gib': psutil.Process().memory_info().rss / 2**30}


def keep_freed_memory():
    """CPU training: keep freed memory in the process for the next step instead of giving it back to the OS.
    glibc maps every tensor over 32 MB (logits chunks, the embedding's gradient) on fresh pages and unmaps them when
    the tensor is freed, so each step page-faults them in again: ~240,000 faults and ~0.4 s of kernel time per
    quickstart step on this 2-core machine. With mmap off and no trimming, large tensors come from the heap and
    reuse what the last step freed (0 faults); the resident size then stays at its high-water mark, as a GPU's
    caching allocator does. Returns one line saying what was done."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameter numbers in glibc's malloc.h
        if libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1):
            return "cpu memory: freed tensors stay in the process for reuse (glibc mallopt: no mmap, no trim)"
    except (OSError, AttributeError):
        pass
    return ("cpu memory: no glibc mallopt here (or it refused), so freed tensors go back to the OS and are "
            "page-faulted in again each step")


def memory_text(m):
    if 'gpu_used_gib' in m:
        return (f"gpu {m['gpu_used_gib']:.1f}/{m['gpu_total_gib']:.1f} GiB (allocated {m['gpu_allocated_gib']:.1f}, "
                f"reserved {m['gpu_reserved_gib']:.1f})")
    return f"rss {m['rss_gib']:.2f} GiB"


def peak_flops(device, dtype, repeats=5):
    """(FLOP/s, where it came from), or (None, why not): looked up per GPU, measured on CPU."""
    if str(device).startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        if peak and dtype == torch.float32:
            return None, f"{name} in float32: no peak in the table, MFU not reported"
        return (peak, f"{name}, looked up") if peak else (None, f"{name} is not in the table, MFU not reported")
    n = 2048 if dtype == torch.float32 else 4096
    a = torch.randn(n, n, dtype=dtype, generator=torch.Generator().manual_seed(0))  # training's RNG untouched
    a @ a  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0), f"a {n}^3 {str(dtype)[6:]} matmul on this machine"


def student_flops_per_token(model, block_size):
    """Forward + backward FLOPs per trained token (6N + 12 L T C)."""
    cfg = model.config
    return 6 * model.num_params() + 12 * cfg.n_layer * block_size * cfg.n_embd


def teacher_flops_per_token(teacher, block_size):
    """Forward FLOPs per token (2N + 4 L T C) of a Hugging Face causal LM."""
    cfg = teacher.config
    n = sum(p.numel() for p in teacher.parameters())
    if not getattr(cfg, 'tie_word_embeddings', False):
        n -= teacher.get_input_embeddings().weight.numel()  # a lookup, not a matmul; the separate head is
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * n + 4 * cfg.num_hidden_layers * block_size * cfg.num_attention_heads * head_dim


def repetition(ids):
    """Distinct-n (unique n-grams / n-grams, Li et al. 2016) and the share of the most frequent token, for one
    generated sequence of token ids. A collapsed student (seed 001: '::::::', 'did did did') has distinct-2
    near 0 and one token taking most of the output."""
    n = len(ids)
    grams = lambda k: [tuple(ids[i:i + k]) for i in range(n - k + 1)]
    distinct = lambda k: len(set(grams(k))) / max(1, n - k + 1)
    return {'distinct_1': distinct(1), 'distinct_2': distinct(2),
            'top_share': Counter(ids).most_common(1)[0][1] / n if n else 0.0}


def collapsed(stats, min_distinct_2=0.3, max_top_share=0.5):
    """True when a generation looks like mode collapse: few distinct bigrams, or one token dominating."""
    return stats['distinct_2'] < min_distinct_2 or stats['top_share'] > max_top_share


def require(module, switch):
    """Import an optional logger only when its switch is on; if it is missing, one line saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"indra: --{switch}=True needs the {module} package: pip install {module} "
                         f"(or run with --{switch}=False)") from None


class Records:
    """Every record goes to out_dir/log.jsonl (one JSON object per line); numeric fields also go to
    Weights & Biases (seed 001, offline mode supported) and Aim (seed 003) when switched on."""

    def __init__(self, out_dir, config, resume=False, wandb_log=False, wandb_project='indra', wandb_run_name='',
                 wandb_mode='online', aim_log=False, aim_repo=''):
        self.path = Path(out_dir) / 'log.jsonl'
        self.wandb = self.aim = None
        if wandb_log:
            wandb = require('wandb', 'wandb_log')
            id_file = Path(out_dir) / 'wandb_run_id'  # a resumed run continues the same W&B run
            run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name or None, mode=wandb_mode, id=run_id,
                                    config=config, dir=str(out_dir), resume='allow')
        if aim_log:
            aim = require('aim', 'aim_log')
            self.aim = aim.Run(repo=aim_repo or str(out_dir), experiment=wandb_project)
            self.aim['hparams'] = config

    def log(self, record):
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != 'iter'}
        if self.wandb is not None:
            self.wandb.log(numbers, step=record['iter'])
        if self.aim is not None:
            for k, v in numbers.items():
                self.aim.track(v, name=k, step=record['iter'])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.aim is not None:
            self.aim.close()
