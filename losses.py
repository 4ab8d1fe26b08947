"""
The distillation loss, per token, masked, averaged over the tokens that count.

    loss = (1 - kd_weight) * sum_t w_t CE_t / sum_t w_t + kd_weight * T^2 * sum_t w_t m_t D_t / sum_t w_t m_t

CE_t is the student's cross-entropy on the next token, D_t the divergence kd_loss between the
teacher's and the student's next-token distributions at temperature T, w_t 1 where the
prediction counts, m_t Teacher.mask (1 where the teacher has a target, e.g. for a student with
its own tokenizer; 1 everywhere without a mask). Each denominator is clamped to >= 1. With
p = softmax(teacher / T) and q = softmax(student / T), per row (divergence()):

    forward_kl  KL(p || q) = sum p log(p / q)                   Hinton et al. 2015; the default
    reverse_kl  KL(q || p)                                      MiniLLM, Gu et al. 2024
    jsd         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
                                                                GKD, Agarwal et al. 2024
    tvd         1/2 sum |p - q|                                 f-divergence KD, Wen et al. 2023
    skew_kl     KL(p || alpha p + (1 - alpha) q)                DistiLLM, Ko et al. 2024

kd_top_k > 0 (seed 002's subset KD): per row, both distributions are renormalized on the union
of the teacher's and the student's top-k tokens, and D is taken on that subset.

Logits at position t predict token t+1, so the loss shifts by one and every mask is shifted
the same way. A prediction counts when its position and its target are real tokens
(attention_mask) and the target is marked by the optional loss_mask (e.g. only the
assistant's tokens). Which tokens count never comes from comparing ids with the pad id: pad
may equal eos (it does for the embedded teacher). The T^2 factor keeps the soft-target
gradients on the same scale as the hard ones when T changes (Hinton et al. 2015, sec. 2); the
argument is for KL, the other divergences keep T^2 as a convention.

    crit = DistillationLoss(kd_weight=0.5, temperature=2.0, kd_loss='forward_kl')
    loss, ce, kd = crit(student_hidden, student_head_weight, idx, attention_mask, loss_mask,
                        teacher=Teacher(hidden=teacher_hidden, head=teacher_head_weight))

Why hidden states and not logits: the loss runs over tokens x vocabulary values (100M for
2,048 tokens of a 49,152-token vocabulary, 311M of Qwen's 151,936). As plain autograd ops on
full logits it holds several fp32 copies of that for both models and makes ~20 passes over
them: 3/4 of a CPU training step. Here the tokens that count are picked first (padding never
reaches a head), then a chunk of them at a time goes through the student's and the teacher's
heads, CE, KL and the gradient with respect to the logits are computed in one cache-sized
pass from the closed forms in kd_rows(), and the gradients of the hidden states and the head
are accumulated. Any other kd_loss, or a kd_top_k subset, is differentiated by autograd on
the chunk's logits only (kd_autograd(): a few (chunk_tokens, V) temporaries; 2-3.5x the loss
time of the closed forms on one CPU thread, 1,024 tokens x 8,192 values, reverse_kl and tvd
least, jsd most). No full (tokens, V) tensor exists for either model. tests/test_losses.py
and tests/test_divergences.py hold it equal, values and gradients, to the plain autograd loss
on full logits.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

KD_LOSSES = ('forward_kl', 'reverse_kl', 'jsd', 'tvd', 'skew_kl')


def counted_tokens(idx, attention_mask=None, loss_mask=None):
    """(B, T) float weights: 1 where the prediction at t of token t+1 counts, else 0 (always 0 at the last t)."""
    w = torch.zeros(idx.shape, device=idx.device)
    w[:, :-1] = 1.0
    if attention_mask is not None:
        w[:, :-1] *= attention_mask[:, :-1] * attention_mask[:, 1:]  # a real position predicting a real token
    if loss_mask is not None:
        w[:, :-1] *= loss_mask[:, 1:]  # the target token is one we train on
    return w


@dataclass
class Teacher:
    """What the teacher says about N rows: its final hidden states and head (logits made chunk by chunk),
    or sparse targets from the cache (teacher.py --cache): log-probs at temperature T of k tokens per row.
    mask, optional: 1 on the rows that have a teacher target; the KD term averages over those only."""
    hidden: torch.Tensor = None  # (N, Ct) or (B, T, Ct)
    head: torch.Tensor = None  # (Vt, Ct), Vt >= V: a teacher padded past its tokenizer is cut to the student's V
    ids: torch.Tensor = None  # (N, k) or (B, T, k) token ids
    logp: torch.Tensor = None  # (N, k) or (B, T, k) log-probabilities at the training temperature
    mask: torch.Tensor = None  # (N,) or (B, T) of 0/1

    def rows(self, keep):
        """The same targets for the rows selected by the bool/index tensor keep."""
        take = lambda x: None if x is None else x.reshape(-1, x.shape[-1])[keep]
        mask = None if self.mask is None else self.mask.reshape(-1)[keep]
        return Teacher(take(self.hidden), self.head, take(self.ids), take(self.logp), mask)


def divergence(log_p, log_q, kind, jsd_beta=0.5, skew_alpha=0.1):
    """D(p, q) per row, (n,), from the teacher's log-probabilities log_p and the student's log_q, (n, V):
        forward_kl  KL(p || q) = sum_v p log(p / q)                      Hinton et al. 2015
        reverse_kl  KL(q || p)                                           MiniLLM, Gu et al. 2024
        jsd         beta KL(p || m) + (1 - beta) KL(q || m), with m = beta p + (1 - beta) q and beta = jsd_beta:
                    the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024). It vanishes at beta = 0
                    and 1, which GKD defines as forward and reverse KL: JSD / beta = KL(p || q) - beta chi2(p || q) / 2
                    + O(beta^2), and JSD / (1 - beta) -> KL(q || p) the same way (JSD_beta(p, q) = JSD_1-beta(q, p)).
        tvd         1/2 sum_v |p - q|                                    Wen et al. 2023, f-divergence KD
        skew_kl     KL(p || alpha p + (1 - alpha) q), alpha = skew_alpha DistiLLM, Ko et al. 2024; alpha = 0: forward KL
    All in log space with 0 log 0 = 0, so a zero probability (-inf) gives no NaN, in values or gradients; a KL is
    +inf where its first argument has mass and its second none, as it should be."""
    # a token that neither puts mass on (outside kd_top_k's subset) adds nothing; log p = log q = 0 there adds
    # exactly 0 to every D below (each term vanishes where p_v = q_v) and keeps -inf - (-inf), a NaN, out of autograd
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
    """a log(a / b) per entry, 0 where a = 0 (as xlogy), with a zero gradient there rather than 0 * inf = NaN."""
    return log_a.exp() * torch.where(torch.isneginf(log_a), 0.0, log_a - log_b)


def log_mix(log_a, log_b, c):
    """log(c a + (1 - c) b) per entry, in log space."""
    if c in (0, 1):
        return log_a if c == 1 else log_b
    return torch.logaddexp(log_a + math.log(c), log_b + math.log(1 - c))


def kd_rows(s, labels, w_ce, w_kd, T, eps, t_logits=None, ids=None, logp=None, need_grad=True, out=None):
    """CE and KL per row of student logits s (n, V), and d(loss)/ds for loss = sum_rows (w_ce CE + w_kd T^2 KL),
    row weights w_ce, w_kd (n,). Closed forms, with q = softmax(s), q_T = softmax(s / T), p = softmax(t / T), label
    smoothing eps over V classes:
        CE  = -(1 - eps) log q[y] - eps/V sum_v log q[v]    dCE/ds  = q - (1 - eps) onehot(y) - eps/V
        KL  = sum_v p (log p - log q_T)                      dKL/ds  = (q_T - p) / T
        dloss/ds = w_ce dCE/ds + w_kd T (q_T - p)
    Sparse teacher (ids, logp on k tokens S, the rest of its mass p_tail in one bucket):
        KL = sum_S p (log p - log q_T) + p_tail (log p_tail - log q_T,tail)
        dKL/ds = (q_T - p') / T, with p' = p on S and q_T * p_tail / q_T,tail off S.
    Without teacher targets, CE only (KL 0). Works a few rows at a time so that each pass over V stays in cache.
    out, optional: an (n, V) tensor of any float dtype that receives d(loss)/ds (else a new fp32 one)."""
    n, V = s.shape
    dtype = torch.promote_types(s.dtype, torch.float32)
    kd = t_logits is not None or ids is not None
    ce, kl = torch.zeros(n, dtype=dtype, device=s.device), torch.zeros(n, dtype=dtype, device=s.device)
    grad = (torch.empty(n, V, dtype=dtype, device=s.device) if out is None else out) if need_grad else None
    step = max(1, 2 ** 18 // V)  # ~1 MB of fp32 per temporary
    if ids is not None:  # the teacher's side of the sparse KL, for all rows at once: (n, k) values, few ops
        p_S = logp.to(dtype).exp()
        p_tail = (1 - p_S.sum(dim=-1)).clamp(min=0)
        log_p_tail = p_tail.clamp(min=1e-30).log()
    for i in range(0, n, step):
        j = min(i + step, n)
        sc, y = s[i:j].to(dtype), labels[i:j, None]
        log_q1 = F.log_softmax(sc, dim=-1)  # log q
        ce[i:j] = -log_q1.gather(1, y).squeeze(1)
        if eps:
            ce[i:j] = (1 - eps) * ce[i:j] - eps * log_q1.mean(dim=-1)
        if kd:
            log_q = log_q1 if T == 1 else F.log_softmax(sc / T, dim=-1)  # log q_T
            if t_logits is not None:
                tt = t_logits[i:j, :V].to(dtype)
                log_p = F.log_softmax(tt if T == 1 else tt / T, dim=-1)
                p = log_p.exp()
                kl[i:j] = (p * (log_p - log_q)).sum(dim=-1)
            else:
                idc, p_s, pt = ids[i:j], p_S[i:j], p_tail[i:j]
                log_q_s = log_q.gather(1, idc)
                # the student's tail mass from its k kept values alone (no pass over V) while it is not tiny;
                # a tiny tail loses its precision in 1 - sum, so then sum it directly (one masked pass)
                q_tail = (1 - log_q_s.double().exp().sum(dim=-1)).to(dtype)
                if (q_tail < 1e-3).any():
                    log_q_tail = log_q.scatter(1, idc, float('-inf')).logsumexp(dim=-1)
                else:
                    log_q_tail = q_tail.log()
                has_tail = (pt > 0) & torch.isfinite(log_q_tail)  # k = V leaves no tail, only rounding in p_tail
                tail = torch.where(has_tail, pt * (log_p_tail[i:j] - log_q_tail), 0.0)
                kl[i:j] = (p_s * (logp[i:j] - log_q_s)).sum(dim=-1) + tail
                r = torch.where(has_tail, (log_p_tail[i:j] - log_q_tail).exp(), 0.0)  # p_tail / q_tail
        if need_grad:  # w_ce (q - eps/V - (1 - eps) onehot(y)) + c q_T - w_kd T p', in place in the exp of log q
            w, wT = w_ce[i:j, None].to(dtype), T * w_kd[i:j, None].to(dtype)
            q = log_q1.exp_()  # log q is spent: it may be log q_T too, so q_T is taken from it now
            q_T = q if T == 1 else log_q.exp_() if kd else None
            c = wT if t_logits is not None else wT * (1 - r[:, None]) if kd else 0  # sparse: q_T (1 - r) off S
            if T == 1:
                g = q.mul_(w + c)
            else:
                g = q.mul_(w)
                if kd:
                    g.addcmul_(q_T, c)
            if eps:
                g.sub_(w * (eps / V))
            g.scatter_add_(1, y, (eps - 1.0) * w)
            if t_logits is not None:
                g.addcmul_(p, wT, value=-1.0)
            elif kd:  # on S: r q_T - p
                g.scatter_add_(1, idc, wT * (r[:, None] * log_q_s.exp() - p_s))
            grad[i:j] = g
    return ce, kl, grad


def kd_autograd(s, t, w, crit, need_grad=True):
    """The divergence crit.kd_loss per row of student logits s (n, V) from teacher logits t (n, V), on the top-k
    union when crit.kd_top_k > 0, and d(sum_rows w D)/ds by autograd on these n rows only."""
    dtype = torch.promote_types(s.dtype, torch.float32)
    with torch.enable_grad():
        s_ = s.detach().to(dtype).requires_grad_(need_grad)
        ls, lt = s_, t.to(dtype)
        if crit.kd_top_k:  # seed 002's subset KD, as a true union: a token in both top-k lists counts once
            k = min(crit.kd_top_k, s.shape[1])
            S = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
            S.scatter_(1, lt.topk(k, dim=-1).indices, True).scatter_(1, s_.topk(k, dim=-1).indices, True)
            ls, lt = ls.masked_fill(~S, float('-inf')), lt.masked_fill(~S, float('-inf'))  # renormalized on S
        T = crit.temperature
        d = divergence(F.log_softmax(lt / T, dim=-1), F.log_softmax(ls / T, dim=-1), crit.kd_loss, crit.jsd_beta,
                       crit.skew_alpha)
        grad = torch.autograd.grad((w * d).sum(), s_)[0] if need_grad else None
    return d.detach(), grad


class ChunkedKD(torch.autograd.Function):
    """The loss over N counted rows from hidden states h (N, C) and a head W (V, C), chunk by chunk, with the
    settings of crit (a DistillationLoss) and row weights w_ce, w_kd (N,) that sum to 1 each (or to 0);
    the gradients of h and W are computed in the forward pass and handed over in backward, when need_grad:
    the caller says so, since a Function's forward always runs without grad mode and sees needs_input_grad
    set even under torch.no_grad() (an evaluation would pay two more head matmuls per chunk)."""

    @staticmethod
    def forward(ctx, h, W, labels, w_ce, w_kd, teacher, crit, need_grad):
        a, T, clamp, chunk = crit.kd_weight, crit.temperature, crit.logit_clamp, crit.chunk_tokens
        closed_form = crit.kd_loss == 'forward_kl' and not crit.kd_top_k  # the fast default: all of it in kd_rows
        N, V = h.shape[0], W.shape[0]
        Wc = W.to(h.dtype)  # the head in h's dtype: the autocast dtype under autocast (DistillationLoss casts h)
        tW = None if teacher is None or teacher.head is None else teacher.head[:V].to(teacher.hidden.dtype)
        ce, kd = torch.zeros(N, device=h.device), torch.zeros(N, device=h.device)
        gh = torch.empty_like(h) if need_grad else None
        gW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_grad else None
        # the (chunk, V) logits and gradient live in buffers made once and reused by every chunk: on a CPU a fresh
        # tensor pays its page faults each time (filling a new 200 MB tensor took 90 ms here, a reused one 18 ms)
        buffer = lambda dtype: torch.empty(min(chunk, N), V, dtype=dtype, device=h.device)
        s_buf, g_buf = buffer(h.dtype), buffer(h.dtype) if need_grad else None
        t_buf = None if tW is None else buffer(tW.dtype)
        gW_buf = torch.empty(W.shape, dtype=h.dtype, device=h.device) if need_grad else None
        for i in range(0, N, chunk):
            j = min(i + chunk, N)
            s = torch.mm(h[i:j], Wc.t(), out=s_buf[:j - i])  # (n, V) student logits of this chunk
            if clamp > 0:  # bounded logits, as Indra.head gives them: c tanh(s / c)
                z = torch.tanh(s.float() / clamp)
                s = clamp * z
            t = None if tW is None else torch.mm(teacher.hidden[i:j], tW.t(), out=t_buf[:j - i])  # the teacher's
            if teacher is None or not closed_form:
                targets = {}
            elif t is not None:
                targets = {'t_logits': t}
            else:
                targets = {'ids': teacher.ids[i:j], 'logp': teacher.logp[i:j]}
            ce[i:j], kd[i:j], g = kd_rows(s, labels[i:j], (1 - a) * w_ce[i:j], a * w_kd[i:j], T, crit.label_smoothing,
                                          **targets, need_grad=need_grad, out=g_buf[:j - i] if need_grad else None)
            if teacher is not None and not closed_form:
                kd[i:j], g_kd = kd_autograd(s, t, a * T * T * w_kd[i:j], crit, need_grad)
                if need_grad:
                    g += g_kd
            if need_grad:  # g: d(loss)/d(logits) in the head's dtype, as autocast's nn.Linear would take it
                if clamp > 0:
                    g.mul_(1 - z * z)  # d(c tanh(s / c))/ds
                gh[i:j] = g @ Wc  # (n, C)
                gW += torch.mm(g.t(), h[i:j], out=gW_buf)  # (V, C), summed in fp32
        loss = ((1 - a) * w_ce * ce + a * T * T * w_kd * kd).sum()
        ctx.save_for_backward(gh, gW)
        ctx.head_dtype = W.dtype
        ce, kd = (w_ce * ce).sum(), (w_kd * kd).sum()
        ctx.mark_non_differentiable(ce, kd)  # for logging only
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kd):
        gh, gW = ctx.saved_tensors
        return (gh * grad_loss.to(gh.dtype), (gW * grad_loss).to(ctx.head_dtype)) + (None,) * 6


class DistillationLoss(nn.Module):

    def __init__(self, kd_weight=0.5, temperature=2.0, label_smoothing=0.0, chunk_tokens=1024, logit_clamp=0.0,
                 kd_loss='forward_kl', jsd_beta=0.5, skew_alpha=0.1, kd_top_k=0):
        super().__init__()
        assert 0.0 <= kd_weight <= 1.0, f"kd_weight={kd_weight} must be in [0, 1]"
        assert temperature > 0, f"temperature={temperature} must be > 0"
        self.kd_weight, self.temperature, self.label_smoothing = kd_weight, temperature, label_smoothing
        self.chunk_tokens = chunk_tokens  # tokens per pass through the heads: bounds the (tokens, V) memory
        self.logit_clamp = logit_clamp  # > 0: the student's logits are c tanh(logits / c), as in Indra.head
        self.kd_loss = kd_loss  # the divergence D: one of KD_LOSSES, see divergence()
        self.jsd_beta, self.skew_alpha = jsd_beta, skew_alpha  # the teacher's weight in jsd's mixture; skew_kl's
        self.kd_top_k = kd_top_k  # > 0: D on the union of the teacher's and the student's top-k tokens; 0: all V
        self.check()

    def check(self, teacher=None):
        """A ValueError for settings that cannot work; forward checks again, as train.py changes settings per step."""
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"kd_loss={self.kd_loss!r}: choose one of {', '.join(KD_LOSSES)}")
        for name in ('jsd_beta', 'skew_alpha'):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.kd_top_k < 0:
            raise ValueError(f"kd_top_k={self.kd_top_k} must be >= 0 (0: the full vocabulary)")
        if teacher is not None and teacher.ids is not None and (self.kd_loss != 'forward_kl' or self.kd_top_k):
            raise ValueError(f"kd_loss={self.kd_loss!r} with kd_top_k={self.kd_top_k} needs the teacher's full logits, "
                             f"which cached targets (k log-probs per row) do not hold; they support only "
                             f"kd_loss='forward_kl' with kd_top_k=0: use teacher_targets='live'")

    def forward(self, hidden, head, idx, attention_mask=None, loss_mask=None, teacher=None):
        """hidden (B, T, C) the student's final hidden states; head (V, C) its output head weight;
        idx (B, T) the input ids; attention_mask, loss_mask (B, T) of 0/1 or None;
        teacher: a Teacher over the same B*T positions, or None when kd_weight == 0.
        Returns (loss, ce, kd): the total to backprop and its two parts, detached, for logging (kd is the raw
        divergence kd_loss averaged over the KD rows, without T^2; 0 when there is no teacher)."""
        B, T, C = hidden.shape
        assert teacher is not None or self.kd_weight == 0, "kd_weight > 0 needs a teacher"
        self.check(teacher)
        w = counted_tokens(idx, attention_mask, loss_mask).view(-1)
        keep = w.nonzero().squeeze(1)  # padding and the last position never reach a head
        w = w[keep]
        labels = torch.cat([idx[:, 1:], idx[:, :1]], dim=1).view(-1)[keep]  # position t predicts token t+1
        teacher = None if teacher is None or self.kd_weight == 0 else teacher.rows(keep)
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # the heads' matmuls in the autocast dtype, as nn.Linear's would be
            amp = torch.get_autocast_dtype(device)  # (the student's final norm gives fp32 under autocast)
            hidden = hidden.to(amp)
            if teacher is not None and teacher.hidden is not None:
                teacher = replace(teacher, hidden=teacher.hidden.to(amp))
        m = w if teacher is None or teacher.mask is None else w * teacher.mask.to(w.dtype)  # the KD rows
        w_ce, w_kd = w / w.sum().clamp(min=1.0), m / m.sum().clamp(min=1.0)  # an all-padding batch gives 0, not 0/0
        need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.requires_grad)
        return ChunkedKD.apply(hidden.reshape(B * T, C)[keep], head, labels, w_ce, w_kd, teacher, self, need_grad)
