"""
The optimizer: parameter groups, AdamW (torch), 8-bit AdamW (bitsandbytes, seed 000) or MuGrokfast (torch's Muon
on the blocks' matrices, AdamW on the rest, the Grokfast gradient filter before each step; seed 001), and the
schedules of one run: the learning rate (linear warmup, then cosine decay to min_lr), the KD weight's
warmup (seed 004) and the falling temperature (seed 003); the EMA of the student's weights (EMA).

    groups = param_groups(named_parameters, weight_decay=0.1, lr_multipliers={'projector.*': 5.0})
    opt = make_optimizer('adamw', groups, lr=1e-3, betas=(0.9, 0.95), device_type='cpu')
    groups = param_groups(named_parameters, 0.1, {}, muon=True)            # the blocks' matrices apart, for Muon
    opt = make_optimizer('mugrokfast', groups, 5e-4, (0.9, 0.95), 'cpu', muon_lr=5e-3, grokfast=(0.98, 0.02))
    for group in opt.param_groups:
        group['lr'] = cosine_lr(it, 1e-3, 1e-4, warmup=20, total=200) * group['lr_mult']
    ema = EMA(model, decay=0.999)
    ema.update(model)                                                   # after every optimizer step
"""
import math
from contextlib import contextmanager
from fnmatch import fnmatch

import torch


def fail(msg):
    raise SystemExit(f"indra: {msg}")


def param_groups(named, weight_decay, lr_multipliers, muon=False):
    """One group per (LR multiplier, weight decay): decay on matrices and embeddings, none on norm gains and biases;
    lr_multipliers scale the LR of the parameters whose names match a pattern (seed 004 gave a projector 5x).
    named: [(name, parameter)], a tied matrix listed once. Every parameter lands in exactly one group.
    muon: the 2-D weights inside the blocks go to groups of their own, marked 'muon' (MuGrokfast); the embedding,
    the head, norms, biases and any matrix outside the blocks (the halting head, projections) stay with AdamW."""
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
        to_muon = muon and name.startswith('blocks.') and p.dim() == 2
        group = groups.setdefault((mult, p.dim() >= 2, to_muon), {'params': [], 'names': [], 'lr_mult': mult,
                                                                  'weight_decay': weight_decay if p.dim() >= 2 else 0.0,
                                                                  **({'muon': to_muon} if muon else {})})
        group['params'].append(p)
        group['names'].append(name)
    assert sum(len(g['params']) for g in groups.values()) == len(named)  # every parameter in exactly one group
    for g in groups.values():
        print(f"optimizer group{' (Muon)' * g.get('muon', False)}: lr x{g['lr_mult']:g}, weight decay "
              f"{g['weight_decay']:g}: {len(g['params'])} tensors, "
              f"{sum(p.numel() for p in g['params']) / 1e6:.2f}M parameters ({', '.join(g.pop('names')[:3])}, ...)")
    return list(groups.values())


def make_optimizer(kind, groups, lr, betas, device_type, muon_lr=0.02, grokfast=(0.98, 2.0)):
    """'adamw': torch's (fused on CUDA); 'adamw8bit': bitsandbytes' 8-bit states (seed 000), CPU and CUDA;
    'mugrokfast': MuGrokfast over groups from param_groups(..., muon=True), Muon at muon_lr, grokfast=(alpha, lambda)."""
    if kind == 'mugrokfast':
        return MuGrokfast(groups, lr, betas, muon_lr, *grokfast, fused=device_type == 'cuda')
    if kind == 'adamw8bit':
        import bitsandbytes as bnb  # bitsandbytes >= 0.45 runs its 8-bit optimizers on CPU too
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == 'cuda')


class MuGrokfast:
    """Seed 001's optimizer as one: torch.optim.Muon on the groups marked 'muon' (the 2-D weights inside the blocks:
    momentum, then the update orthogonalized by Newton-Schulz; Keller Jordan's Muon, with its own LR adjustment,
    sqrt(max(1, rows / columns))), AdamW on the others, and before either steps the Grokfast filter on every
    gradient (Lee et al. 2024, "Grokfast", arXiv:2405.20233, its EMA form):
        ema = alpha ema + (1 - alpha) g,   g <- g + lambda ema        (ema starts at the first g, as theirs does)
    It amplifies the slow, steady part of the gradient. It filters the gradient train.py hands it, after clipping.
    For the loop it is one optimizer: param_groups lists all groups (Muon's first), and a Muon group's lr_mult is
    muon_lr / lr, so train.py's group['lr'] = lr x lr_mult runs Muon on the same schedule, at muon_lr at the peak;
    state_dict() holds both optimizers and the EMA; GradScaler's unscale_ and step see the same param_groups.
    Not for a model without matrices inside blocks named 'blocks.*' (param_groups marks them)."""

    def __init__(self, groups, lr, betas, muon_lr, alpha, lamb, fused=False):
        muon, adamw = [g for g in groups if g['muon']], [g for g in groups if not g['muon']]
        assert muon and adamw, "MuGrokfast takes groups from param_groups(..., muon=True): some Muon's, some not"
        for g in muon:
            g['lr_mult'] *= muon_lr / lr  # Muon's peak LR is muon_lr; the schedule scales both alike
        self.muon = torch.optim.Muon(muon, lr=muon_lr)  # each group's weight_decay, decoupled as in AdamW
        self.adamw = torch.optim.AdamW(adamw, lr=lr, betas=betas, fused=fused)
        self.alpha, self.lamb = alpha, lamb
        self.params = [p for g in self.param_groups for p in g['params']]
        assert len(set(map(id, self.params))) == len(self.params)  # every parameter in exactly one group
        self.ema = [None] * len(self.params)  # Grokfast's EMA of each gradient
        print(f"MuGrokfast: Muon on {sum(len(g['params']) for g in muon)} matrices at peak LR {muon_lr:g} (lr x"
              f"{muon_lr / lr:g}), AdamW on the rest at {lr:g}; Grokfast g + {lamb:g} x EMA(g), alpha {alpha:g}")

    @property
    def param_groups(self):  # a property: load_state_dict gives the inner optimizers new group dicts
        return self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def grokfast(self):
        """g <- g + lambda ema, ema = alpha ema + (1 - alpha) g, for every parameter with a gradient."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.ema[i] is None:
                self.ema[i] = p.grad.detach().clone()
            else:
                self.ema[i].lerp_(p.grad, 1 - self.alpha)
            p.grad.add_(self.ema[i], alpha=self.lamb)

    def step(self, closure=None):
        assert closure is None, "MuGrokfast takes no closure"
        self.grokfast()
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {'muon': self.muon.state_dict(), 'adamw': self.adamw.state_dict(),
                'grokfast': {'alpha': self.alpha, 'lambda': self.lamb, 'ema': list(self.ema)}}

    def load_state_dict(self, state):
        if not isinstance(state, dict) or 'grokfast' not in state:
            fail("this checkpoint's optimizer is not MuGrokfast; resume with its --optimizer (adamw or adamw8bit)")
        self.muon.load_state_dict(state['muon'])
        self.adamw.load_state_dict(state['adamw'])
        self.ema = [None if e is None else e.to(p.device) for e, p in zip(state['grokfast']['ema'], self.params)]


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


class EMA:
    """An exponential moving average of the student's weights, in fp32, updated after every optimizer step:
        shadow = d * shadow + (1 - d) * weights,  d = min(decay, (1 + n) / (10 + n)) at update n
    The ramp on d (as in TensorFlow's ExponentialMovingAverage with num_updates) keeps a short run from
    averaging in its random initialization: with d = 0.999 fixed, 82% of the average after 200 steps is still
    the init. Seed 002 crashed evaluating an EMA whose tensors no longer matched the model; load_state_dict
    checks every name, shape and dtype and names the first that does not fit."""

    def __init__(self, model, decay):
        assert 0.0 < decay < 1.0, f"ema_decay={decay} must be in (0, 1)"
        self.decay, self.updates = decay, 0
        # named_parameters lists the tied embedding/head once (as wte.weight): one shadow for one matrix
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model):
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.float(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model):
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k])

    def state_dict(self):
        return {'decay': self.decay, 'updates': self.updates, 'shadow': self.shadow}

    def load_state_dict(self, state, where='the checkpoint'):
        """Take a saved EMA, onto this model's device; any mismatch is an error naming the parameter."""
        saved = state['shadow']
        for k, mine in self.shadow.items():
            if k not in saved:
                raise ValueError(f"EMA in {where} has no {k}; it was saved for another model")
            if saved[k].shape != mine.shape:
                raise ValueError(f"EMA in {where}: {k} has shape {tuple(saved[k].shape)}, "
                                 f"the model's is {tuple(mine.shape)}")
            if saved[k].dtype != torch.float32:
                raise ValueError(f"EMA in {where}: {k} is {saved[k].dtype}, expected torch.float32")
        extra = sorted(set(saved) - set(self.shadow))
        if extra:
            raise ValueError(f"EMA in {where} has {extra[0]}, which the model does not; it was saved for another model")
        self.shadow = {k: saved[k].to(mine.device) for k, mine in self.shadow.items()}
        self.updates = state['updates']

    @contextmanager
    def applied(self, model):
        """Inside the block the model holds the EMA weights; its own come back afterwards."""
        own = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(own[k])
