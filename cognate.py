"""
Seed 001's Cognate student, as options of the indra student (model.py) rather than a second model:

  recursions  the n_layer blocks applied this many times with shared weights, each pass refining every token's
              state (a tiny recursive model: Jolicoeur-Martineau 2025, "Less is More: Recursive Reasoning with Tiny
              Networks", arXiv:2510.04871)
  act         a halting head after each pass; the output is the passes weighted by the halting distribution,
              with a ponder cost (Graves 2016, "Adaptive Computation Time", arXiv:1603.08983) and seed 001's
              diversity term, which keeps the halting probabilities from all becoming the same (its variance was 0)
  ltm         in every block, a causal decaying memory of a compressed view of the tokens, read back through a
              learned gate (Behrouz et al. 2024, "Titans", arXiv:2501.00663: memory as a gate, MAG). Nothing is
              carried from one sequence to the next (seed 001's memory depended on the batch it was in)

Every pass is computed for every token (no data-dependent control flow: batches, DDP, torch.compile and the
key/value cache stay as they are); ACT decides how the passes are mixed, not how many run. The optimizer that
goes with it, MuGrokfast (Muon + Grokfast), is in optim.py.

The options enter the student (model.py) at four named places: memory() in each Block's construction (the
memory, and the forward hook that adds it to the block's output), halting_head() and init() in Indra's, and
passes() in Indra.hidden_states, which runs the blocks for a student with any of them (on()).

    p = act_weights(h)                                  # (B, T, N) from h (B, T, N-1), each token's sums to 1
    passes, halt_var = act_stats(h, p, counted)         # over the tokens the loss counts
    m = decaying_memory(c, real, decay=0.9, m0=m0)      # (B, T, D), the parallel form of the loop
    x = passes(model, x, step)                          # the blocks, step(k, block, x) running each
    loss, figures = terms(model, counted)               # ACT's terms of the last forward, and its figures
python -m pytest tests/test_cognate.py
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def act_weights(h):
    """ACT's halting distribution over N passes from the halting probabilities after passes 1..N-1, h (B, T, N-1):
    p_n = h_n prod_{m<n} (1 - h_m) for n < N, and the remainder prod_{m<N} (1 - h_m) for the last pass, so that
    each token's p sums to 1 (Graves 2016, eq. 6-7 with the remainder on the last pass). Returns (B, T, N)."""
    going = torch.cumprod(1 - h, dim=-1)  # (B, T, N-1): still going after pass n
    before = torch.cat([torch.ones_like(h[..., :1]), going[..., :-1]], dim=-1)  # still going before pass n
    return torch.cat([h * before, going[..., -1:]], dim=-1)


def act_stats(h, p, counted):
    """(mean expected passes, halting-probability variance) over the tokens counted (B, T) weighs, padding 0.
    Expected passes per token = sum_n n p_n (the ponder cost). The variance is taken over the counted tokens for
    each pass's halting probability, then averaged over the passes: how much tokens differ (seed 001 wants > 0.05)."""
    w = counted.to(p.dtype)
    total = w.sum().clamp(min=1.0)
    n = torch.arange(1, p.size(-1) + 1, device=p.device, dtype=p.dtype)
    passes = ((p * n).sum(-1) * w).sum() / total
    mean = (h * w[..., None]).sum((0, 1)) / total  # (N-1,)
    var = (((h - mean) ** 2) * w[..., None]).sum((0, 1)) / total
    return passes, var.mean()


def decaying_memory(c, real, decay, m0):
    """m_t = decay m_(t-1) + (1 - decay) c_t from m_0 = m0, where a padding position (real 0) leaves m unchanged;
    all T states at once. c: (B, T, D); real: (B, T) 1/0 or None; m0: (D,) or (B, D). Returns (B, T, D).

    Unrolled, m_t = decay^(k_t) m0 + sum_(s<=t, real) decay^(k_t - k_s) (1 - decay) c_s with k_t the real tokens up
    to t: a lower-triangular (T, T) matrix per row. Its exponents k_t - k_s are never negative, so no power is ever
    divided by another (a cumulative sum scaled by decay^(-t) would overflow fp32 past ~800 tokens at decay 0.9).
    tests/test_cognate.py holds it equal to the loop."""
    B, T, _ = c.shape
    r = torch.ones(B, T, device=c.device) if real is None else real.float()
    k = r.cumsum(1)  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=c.device).tril()
    gaps = (k[:, :, None] - k[:, None, :]).clamp(min=0)  # (B, T, T): k_t - k_s
    mix = torch.where(causal, decay ** gaps, 0.0) * ((1 - decay) * r)[:, None, :]  # (B, T, T)
    m = mix @ c.float() + (decay ** k)[..., None] * m0.float().view(-1, 1, m0.size(-1))
    return m.to(c.dtype)


class Memory(nn.Module):
    """A block's long-term memory, Titans' MAG in small: a compressed view of the (normed) block output,
    c = down(x) in ltm_dim, runs through decaying_memory from a learned m0; it is read back to n_embd and added to
    the block's output through a learned gate, x + sigmoid(gate(x)) * proj(m). Per sequence: the state starts at m0
    for every sequence, padding does not enter it. In generation the state at the last position stays in the
    key/value cache (kvcache.py), so each new token continues from it."""

    def __init__(self, n_embd, dim, decay, eps=None):
        super().__init__()
        self.decay = decay
        self.norm = nn.RMSNorm(n_embd, eps=eps)
        self.down = nn.Linear(n_embd, dim, bias=False)
        self.m0 = nn.Parameter(torch.zeros(dim))  # the learned initial memory
        self.proj = nn.Linear(dim, n_embd, bias=False)  # a residual projection: scaled by depth at init, as the rest
        self.gate = nn.Linear(n_embd, n_embd)  # zero bias at init: the gate starts at 0.5
        self.gate_mean = None  # (B, T): the gate's mean over channels at the last forward, for the log

    def forward(self, x, real=None, m0=None):
        """(what the block adds to x (B, T, C), the memory's states (B, T, ltm_dim)). real: (B, T) 1 real / 0 pad,
        or None; m0: (B, ltm_dim), the state to continue from (generation), or None for the learned one."""
        u = self.norm(x)
        m = decaying_memory(self.down(u), real, self.decay, self.m0 if m0 is None else m0)  # (B, T, ltm_dim)
        g = torch.sigmoid(self.gate(u))
        self.gate_mean = g.detach().float().mean(-1)
        return g * self.proj(m), m


def on(cfg):
    """Whether the IndraConfig cfg asks for any of the options (else it is the plain student)."""
    return cfg.recursions > 1 or cfg.act or cfg.ltm


def check(cfg):
    """The options' settings make sense (IndraConfig's __post_init__)."""
    assert cfg.recursions >= 1 and (cfg.recursions > 1 or not cfg.act), \
        f"recursions={cfg.recursions}, act={cfg.act}: recursions must be >= 1, and > 1 for ACT to mix passes"
    assert 0.0 < cfg.ltm_decay < 1.0, f"ltm_decay={cfg.ltm_decay} must be in (0, 1)"


def memory(block, cfg):
    """The Memory of a Block being built (None without ltm). A forward hook adds it to the block's output, so
    whatever calls the block (the forward, gradient checkpointing, matching.py) gets block output + memory."""
    if not cfg.ltm:
        return None
    block.register_forward_hook(remember)
    return Memory(cfg.n_embd, cfg.ltm_dim, cfg.ltm_decay, cfg.norm_eps or None)


def remember(block, args, x):
    """The hook: x + block.memory's read of x. args: block's (input, additive mask); the real tokens are the keys
    the mask lets the last query see (padding is -inf in every row), all of them when there is no mask."""
    mask = args[1]
    real = None if mask is None else mask[:, 0, -1] == 0  # (B, T)
    return x + block.memory(x, real)[0]


def halting_head(cfg):
    """ACT's halting head (one logit per token and pass), built where Indra builds it (after the head); None
    without act."""
    return nn.Linear(cfg.n_embd, 1) if cfg.act else None


def init(model):
    """After Indra's initialization: the halting bias, and model.cognate, the figures of the last forward."""
    if model.halt is not None:  # h = sigmoid(-3) = 0.05 per pass: at first the output is mostly the last pass
        nn.init.constant_(model.halt.bias, -3.0)
    model.cognate = {}  # the halting probabilities, ACT weights and memory gates of the last forward (terms)


def passes(model, x, step):
    """x (B, T, C) after the embedding -> after the blocks: model.blocks applied config.recursions times, block
    k = pass x n_layer + i by step(k, block, x) (the forward's runs block(x, mask); matching.py and kvcache.py give
    their own); with ACT each token's output is its passes weighted by where it halts. Sets model.cognate."""
    n, halts, states, gates = model.config.recursions, [], [], []
    for r in range(n):  # the same blocks every pass (TRM)
        for i, block in enumerate(model.blocks):
            x = step(r * len(model.blocks) + i, block, x)
            if block.memory is not None:
                gates.append(block.memory.gate_mean)
        if model.halt is not None:
            states.append(x)
            if r < n - 1:  # the last pass takes the remainder: no halting probability of its own
                halts.append(torch.sigmoid(model.halt(F.rms_norm(x, (x.size(-1),)))).squeeze(-1).float())
    model.cognate = {'gate': torch.stack(gates).mean(0)} if gates else {}
    if model.halt is not None:  # ACT: each token's output is its passes weighted by where it halts
        h = torch.stack(halts, dim=-1)  # (B, T, N-1)
        p = act_weights(h)  # (B, T, N)
        x = sum(p[..., k, None].to(s.dtype) * s for k, s in enumerate(states))
        model.cognate.update(halt=h, p=p)
    return x


def terms(model, counted):
    """(the auxiliary loss of model's last forward, its figures for the log) over the tokens counted (B, T) weighs
    (the loss's own, losses.counted_tokens: padding never counts). ACT: act_ponder_weight x the mean expected
    passes + act_diversity_weight x max(0, act_target_variance - the halting variance); the memory: the mean gate,
    over blocks and passes."""
    c, got = model.config, model.cognate
    loss, figures = torch.zeros((), device=counted.device), {}
    w = counted.float()
    if 'gate' in got:
        figures['gate'] = ((got['gate'] * w).sum() / w.sum().clamp(min=1.0)).detach()
    if 'halt' in got:
        passes, var = act_stats(got['halt'], got['p'], w)
        loss = c.act_ponder_weight * passes + c.act_diversity_weight * (c.act_target_variance - var).clamp(min=0)
        figures.update(passes=passes.detach(), halt_var=var.detach())
    return loss, figures


def report(c):
    """The options' part of Indra.param_report()'s line, '' for the plain student."""
    return (f" (with a memory of {c.ltm_dim})" * c.ltm + f", applied {c.recursions} times" * (c.recursions > 1)
            + f" + halting head {c.n_embd + 1}" * c.act)
