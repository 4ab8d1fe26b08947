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

    p = act_weights(h)                                  # (B, T, N) from h (B, T, N-1), each token's sums to 1
    passes, halt_var = act_stats(h, p, counted)         # over the tokens the loss counts
    m = decaying_memory(c, real, decay=0.9, m0=m0)      # (B, T, D), the parallel form of the loop
python -m pytest tests/test_cognate.py
"""
import torch
import torch.nn as nn


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
    for every sequence, padding does not enter it. In generation the state at the last position stays in the block's
    cache, so each new token continues from it."""

    def __init__(self, n_embd, dim, decay, eps=None):
        super().__init__()
        self.decay = decay
        self.norm = nn.RMSNorm(n_embd, eps=eps)
        self.down = nn.Linear(n_embd, dim, bias=False)
        self.m0 = nn.Parameter(torch.zeros(dim))  # the learned initial memory
        self.proj = nn.Linear(dim, n_embd, bias=False)  # a residual projection: scaled by depth at init, as the rest
        self.gate = nn.Linear(n_embd, n_embd)  # zero bias at init: the gate starts at 0.5
        self.gate_mean = None  # (B, T): the gate's mean over channels at the last forward, for the log

    def forward(self, x, real=None, cache=None):
        u = self.norm(x)
        m0 = cache['m'] if cache is not None and 'm' in cache else self.m0  # the attention filled k, v first
        m = decaying_memory(self.down(u), real, self.decay, m0)  # (B, T, ltm_dim)
        if cache is not None:
            cache['m'] = m[:, -1]  # (B, ltm_dim): where the next tokens continue from
        g = torch.sigmoid(self.gate(u))
        self.gate_mean = g.detach().float().mean(-1)
        return g * self.proj(m)
