"""
The distillation loss, per token, masked, averaged over the tokens that count:

    loss = (1 - kd_weight) * sum_t w_t CE_t / sum_t w_t
           + kd_weight * T^2 * sum_t w_t m_t D_t / sum_t w_t m_t

CE_t is the student's cross-entropy on the next token, D_t the divergence kd_loss between the
teacher's and the student's next-token distributions at temperature T, w_t 1 where the
prediction counts, m_t Teacher.mask (1 where the teacher has a target, e.g. for a student with
its own tokenizer; 1 everywhere without a mask). Each denominator is clamped to >= 1. With
p = softmax(teacher / T) and q = softmax(student / T), per row (divergence()):

    forward_kl  KL(p || q) = sum p log(p / q)              Hinton et al. 2015; the default
    reverse_kl  KL(q || p)                                 MiniLLM, Gu et al. 2024
    jsd         beta KL(p || m) + (1 - beta) KL(q || m),   GKD, Agarwal et al. 2024
                m = beta p + (1 - beta) q
    tvd         1/2 sum |p - q|                            f-divergence KD, Wen et al. 2023
    skew_kl     KL(p || alpha p + (1 - alpha) q)           DistiLLM, Ko et al. 2024

kd_top_k > 0 (subset KD): per row, both distributions are renormalized on the union of the
teacher's and the student's top-k tokens, and D is taken on that subset.

Logits at t predict token t+1, so the loss and every mask shift by one. A prediction counts
when its position and its target are real tokens (attention_mask) and the target is in the
optional loss_mask (e.g. the assistant's tokens); never by comparing ids with the pad id, which
may equal eos. T^2 keeps the soft-target gradients on the scale of the hard ones as T changes
(Hinton et al. 2015, sec. 2; for KL, a convention for the others).

reference_loss() is this definition as plain autograd on full logits. DistillationLoss, which
training uses, computes the same loss from hidden states and heads, chunk by chunk
(chunked_loss.py); tests hold the two equal.

    crit = DistillationLoss(kd_weight=0.5, temperature=2.0, kd_loss='forward_kl')
    loss, ce, kd = crit(hidden, head_weight, idx, attention_mask, loss_mask,
                        teacher=Teacher(hidden=teacher_hidden, head=teacher_head_weight))
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import chunked_loss  # the fast path of DistillationLoss; it uses divergence(), counted_tokens()

KD_LOSSES = ('forward_kl', 'reverse_kl', 'jsd', 'tvd', 'skew_kl')


def reference_loss(logits, idx, attention_mask=None, loss_mask=None, teacher_logits=None,
                   teacher_mask=None, kd_weight=0.5, temperature=2.0, label_smoothing=0.0,
                   logit_clamp=0.0, kd_loss='forward_kl', jsd_beta=0.5, skew_alpha=0.1, kd_top_k=0):
    """The loss by its definition: (loss, ce, kd) as DistillationLoss returns them, from the
    student's logits (B, T, V) and the teacher's (B, T, Vt >= V, cut to V) or None; idx and the
    masks (B, T) as DistillationLoss.forward takes them, teacher_mask as Teacher.mask, the
    settings as DistillationLoss's constructor takes them."""
    T, V = temperature, logits.shape[-1]
    w = counted_tokens(idx, attention_mask, loss_mask)[:, :-1]  # logits at t predict token t+1
    s = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    if logit_clamp > 0:
        s = logit_clamp * torch.tanh(s / logit_clamp)
    ce = F.cross_entropy(s.transpose(1, 2), idx[:, 1:], reduction='none',
                         label_smoothing=label_smoothing)
    ce = (w * ce).sum() / w.sum().clamp(min=1)
    kd = torch.zeros_like(ce)
    if teacher_logits is not None and kd_weight > 0:
        ls, lt = s, teacher_logits[:, :-1, :V].to(s.dtype)
        if kd_top_k > 0:  # each token of the union once, the rest at -inf: probability 0
            top = lambda x: x.topk(min(kd_top_k, V), dim=-1).indices
            S = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top(lt), True)
            S.scatter_(-1, top(ls), True)
            ls, lt = ls.masked_fill(~S, float('-inf')), lt.masked_fill(~S, float('-inf'))
        d = divergence(F.log_softmax(lt / T, dim=-1), F.log_softmax(ls / T, dim=-1), kd_loss,
                       jsd_beta, skew_alpha)
        m = w if teacher_mask is None else w * teacher_mask[:, :-1]
        kd = (m * d).sum() / m.sum().clamp(min=1)
    return (1 - kd_weight) * ce + kd_weight * T * T * kd, ce.detach(), kd.detach()


def divergence(log_p, log_q, kind, jsd_beta=0.5, skew_alpha=0.1):
    """D(p, q) per row, (...,), from the teacher's log-probabilities log_p and the student's
    log_q, (..., V): kind as in the table above, with beta = jsd_beta, alpha = skew_alpha.
    jsd vanishes at beta = 0 and 1, which GKD defines as forward and reverse KL:
    JSD / beta = KL(p || q) - beta chi2(p || q) / 2 + O(beta^2), and JSD / (1 - beta) tends to
    KL(q || p) the same way (JSD_beta(p, q) = JSD_1-beta(q, p)); skew_kl at alpha = 0 is
    forward KL. All in log space with 0 log 0 = 0, so a zero probability (-inf) gives no NaN,
    in values or gradients; a KL is +inf where its first argument has mass and its second
    none, as it should be."""
    # a token that neither puts mass on (outside kd_top_k's subset) adds nothing: log p = log q
    # = 0 there adds exactly 0 to every D below (each term vanishes where p_v = q_v) and keeps
    # -inf - (-inf), a NaN, out of autograd
    none = torch.isneginf(log_p) & torch.isneginf(log_q)
    log_p, log_q = log_p.masked_fill(none, 0.0), log_q.masked_fill(none, 0.0)
    if kind == 'jsd' and jsd_beta in (0, 1):
        kind = 'forward_kl' if jsd_beta == 0 else 'reverse_kl'
    if kind == 'forward_kl':
        d = kl_terms(log_p, log_q)
    elif kind == 'reverse_kl':
        d = kl_terms(log_q, log_p)
    elif kind == 'jsd':
        log_m = log_mix(log_p, log_q, jsd_beta)
        d = jsd_beta * kl_terms(log_p, log_m) + (1 - jsd_beta) * kl_terms(log_q, log_m)
    elif kind == 'tvd':
        d = 0.5 * (log_p.exp() - log_q.exp()).abs()
    elif kind == 'skew_kl':
        d = kl_terms(log_p, log_mix(log_p, log_q, skew_alpha))
    else:
        raise ValueError(f"kd_loss={kind!r}: choose one of {', '.join(KD_LOSSES)}")
    return d.sum(dim=-1)


def kl_terms(log_a, log_b):
    """a log(a / b) per entry, 0 where a = 0 (as xlogy), with a zero gradient there rather than
    0 * inf = NaN."""
    return log_a.exp() * torch.where(torch.isneginf(log_a), 0.0, log_a - log_b)


def log_mix(log_a, log_b, c):
    """log(c a + (1 - c) b) per entry, in log space."""
    if c in (0, 1):
        return log_a if c == 1 else log_b
    return torch.logaddexp(log_a + math.log(c), log_b + math.log(1 - c))


def counted_tokens(idx, attention_mask=None, loss_mask=None):
    """(B, T) float weights: 1 where the prediction at t of token t+1 counts, else 0 (always 0
    at the last t)."""
    w = torch.zeros(idx.shape, device=idx.device)
    w[:, :-1] = 1.0
    if attention_mask is not None:  # a real position predicting a real token
        w[:, :-1] *= attention_mask[:, :-1] * attention_mask[:, 1:]
    if loss_mask is not None:
        w[:, :-1] *= loss_mask[:, 1:]  # the target token is one we train on
    return w


@dataclass
class Teacher:
    """What the teacher says about N rows: its final hidden states and head (logits made chunk
    by chunk), or sparse targets from the cache (teacher.py --cache): log-probs at temperature T
    of k tokens per row. mask, optional: 1 on the rows that have a teacher target; the KD term
    averages over those only."""
    hidden: torch.Tensor = None  # (N, Ct) or (B, T, Ct)
    head: torch.Tensor = None  # (Vt, Ct), Vt >= V: a teacher padded past V is cut to V
    ids: torch.Tensor = None  # (N, k) or (B, T, k) token ids
    logp: torch.Tensor = None  # (N, k) or (B, T, k) log-probabilities at the training temperature
    mask: torch.Tensor = None  # (N,) or (B, T) of 0/1

    def rows(self, keep):
        """The same targets for the rows selected by the bool/index tensor keep."""
        take = lambda x: None if x is None else x.reshape(-1, x.shape[-1])[keep]
        mask = None if self.mask is None else self.mask.reshape(-1)[keep]
        return Teacher(take(self.hidden), self.head, take(self.ids), take(self.logp), mask)


class DistillationLoss(nn.Module):

    def __init__(self, kd_weight=0.5, temperature=2.0, label_smoothing=0.0, chunk_tokens=1024,
                 logit_clamp=0.0, kd_loss='forward_kl', jsd_beta=0.5, skew_alpha=0.1, kd_top_k=0):
        super().__init__()
        assert 0.0 <= kd_weight <= 1.0, f"kd_weight={kd_weight} must be in [0, 1]"
        assert temperature > 0, f"temperature={temperature} must be > 0"
        self.kd_weight, self.temperature = kd_weight, temperature
        self.label_smoothing = label_smoothing
        self.chunk_tokens = chunk_tokens  # tokens per pass through the heads: bounds the memory
        self.logit_clamp = logit_clamp  # > 0: the student's logits are c tanh(logits / c)
        self.kd_loss = kd_loss  # the divergence D: one of KD_LOSSES, see divergence()
        self.jsd_beta, self.skew_alpha = jsd_beta, skew_alpha  # the teacher's mixture weights
        self.kd_top_k = kd_top_k  # > 0: D on the union of both models' top-k tokens; 0: all V
        self.check()

    def check(self, teacher=None):
        """A ValueError for settings that cannot work; forward checks again, as train.py changes
        settings per step."""
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"kd_loss={self.kd_loss!r}: choose one of {', '.join(KD_LOSSES)}")
        for name in ('jsd_beta', 'skew_alpha'):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.kd_top_k < 0:
            raise ValueError(f"kd_top_k={self.kd_top_k} must be >= 0 (0: the full vocabulary)")
        sparse = teacher is not None and teacher.ids is not None
        if sparse and (self.kd_loss != 'forward_kl' or self.kd_top_k):
            raise ValueError(f"kd_loss={self.kd_loss!r} with kd_top_k={self.kd_top_k} needs the "
                             f"teacher's full logits, which cached targets (k log-probs per row) "
                             f"do not hold; they support only kd_loss='forward_kl' with "
                             f"kd_top_k=0: use teacher_targets='live'")

    def forward(self, hidden, head, idx, attention_mask=None, loss_mask=None, teacher=None):
        """hidden (B, T, C) the student's final hidden states; head (V, C) its output head weight;
        idx (B, T) the input ids; attention_mask, loss_mask (B, T) of 0/1 or None;
        teacher: a Teacher over the same B*T positions, or None when kd_weight == 0.
        Returns (loss, ce, kd): the total to backprop and its two parts, detached, for logging
        (kd is the raw divergence kd_loss averaged over the KD rows, without T^2; 0 when there
        is no teacher). The loss of reference_loss(), computed by chunked_loss.py."""
        assert teacher is not None or self.kd_weight == 0, "kd_weight > 0 needs a teacher"
        self.check(teacher)
        return chunked_loss.distillation_loss(self, hidden, head, idx, attention_mask, loss_mask,
                                              teacher)
