"""
The optimizer: parameter groups, AdamW (torch) or 8-bit AdamW (bitsandbytes, seed 000), and the
schedules of one run: the learning rate (linear warmup, then cosine decay to min_lr), the KD weight's
warmup (seed 004) and the falling temperature (seed 003).

    groups = param_groups(named_parameters, weight_decay=0.1, lr_multipliers={'projector.*': 5.0})
    opt = make_optimizer('adamw', groups, lr=1e-3, betas=(0.9, 0.95), device_type='cpu')
    for group in opt.param_groups:
        group['lr'] = cosine_lr(it, 1e-3, 1e-4, warmup=20, total=200) * group['lr_mult']
"""
import math
from fnmatch import fnmatch

import torch


def fail(msg):
    raise SystemExit(f"indra: {msg}")


def param_groups(named, weight_decay, lr_multipliers):
    """One group per (LR multiplier, weight decay): decay on matrices and embeddings, none on norm gains and biases;
    lr_multipliers scale the LR of the parameters whose names match a pattern (seed 004 gave a projector 5x).
    named: [(name, parameter)], a tied matrix listed once. Every parameter lands in exactly one group."""
    for pattern in lr_multipliers:
        if not any(fnmatch(name, pattern) for name, _ in named):
            fail(f"lr_multipliers pattern {pattern!r} matches no parameter; names look like "
                 f"{', '.join(name for name, _ in named[:4])}")
    groups = {}
    for name, p in named:
        hits = [pattern for pattern in lr_multipliers if fnmatch(name, pattern)]
        if len(hits) > 1:
            fail(f"parameter {name} matches lr_multipliers patterns {hits[0]!r} and {hits[1]!r}; make them disjoint")
        mult = float(lr_multipliers[hits[0]]) if hits else 1.0
        group = groups.setdefault((mult, p.dim() >= 2), {'params': [], 'names': [], 'lr_mult': mult,
                                                         'weight_decay': weight_decay if p.dim() >= 2 else 0.0})
        group['params'].append(p)
        group['names'].append(name)
    assert sum(len(g['params']) for g in groups.values()) == len(named)  # every parameter in exactly one group
    for g in groups.values():
        print(f"optimizer group: lr x{g['lr_mult']:g}, weight decay {g['weight_decay']:g}: {len(g['params'])} tensors, "
              f"{sum(p.numel() for p in g['params']) / 1e6:.2f}M parameters ({', '.join(g.pop('names')[:3])}, ...)")
    return list(groups.values())


def make_optimizer(kind, groups, lr, betas, device_type):
    """'adamw': torch's (fused on CUDA); 'adamw8bit': bitsandbytes' 8-bit states (seed 000), CPU and CUDA."""
    if kind == 'adamw8bit':
        import bitsandbytes as bnb  # bitsandbytes >= 0.45 runs its 8-bit optimizers on CPU too
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == 'cuda')


def cosine_lr(it, lr, min_lr, warmup, total, decay=True):
    """Linear warmup over `warmup` steps, then cosine decay from lr to min_lr at step `total`; min_lr after."""
    if not decay:
        return lr
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= total:
        return min_lr
    ratio = (it - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def kd_weight_at(it, kd_weight, start, warmup_frac, total):
    """Seed 004: a KD term at full weight from step 0 drowned the run (KL 9.4 from a random projector);
    ramping it in from `start` over warmup_frac of training lets the student and any projector settle first."""
    ramp = warmup_frac * total
    return kd_weight if it >= ramp else start + (kd_weight - start) * it / ramp


def temperature_at(it, temperature, start, end, total):
    """Seed 003's dynamic temperature: soft targets early (more of the teacher's dark knowledge), sharp late.
    start 0: the fixed temperature."""
    if not start:
        return temperature
    return start + (end - start) * min(1.0, it / total)
