"""
The distillation loss of losses.py computed faster: the same values and gradients as
losses.reference_loss() (tests hold them equal), without a (tokens, V) tensor for either model.
losses.DistillationLoss calls distillation_loss() below.

Why hidden states and not logits: the loss runs over tokens x vocabulary values (100M for 2,048
tokens of a 49,152-token vocabulary, 311M of Qwen's 151,936). As plain autograd ops on full
logits it holds several fp32 copies of that for both models and makes ~20 passes over them,
which on a CPU is most of a training step. Here the tokens that count are picked first (padding
never reaches a head), then a chunk of them at a time goes through the student's and the
teacher's heads; CE, KL and the gradient with respect to the logits are computed in one
cache-sized pass from the closed forms in kd_rows(), and the gradients of the hidden states and
of the head are accumulated. Any other kd_loss, or a kd_top_k subset, is differentiated by
autograd on the chunk's logits only (kd_autograd(): a few (chunk_tokens, V) temporaries, a few
times the work of the closed forms). kd_rows() also takes the cache's sparse targets (Teacher.ids
and logp: k tokens per row, the rest of the teacher's mass in one bucket), which reference_loss,
a definition on full logits, does not. The chunk's logits and gradient live in buffers made once
per call and reused by every chunk: on a CPU a fresh tensor pays its page faults each time.
"""
from dataclasses import replace

import torch
import torch.nn.functional as F

import losses  # counted_tokens() and divergence(); losses imports this module too


def distillation_loss(crit, hidden, head, idx, attention_mask=None, loss_mask=None, teacher=None):
    """(loss, ce, kd) of crit (a DistillationLoss) with DistillationLoss.forward's arguments: the counted rows are
    picked, labelled with the next token and weighted, then ChunkedKD runs the heads and the loss on them."""
    B, T, C = hidden.shape
    w = losses.counted_tokens(idx, attention_mask, loss_mask).view(-1)
    keep = w.nonzero().squeeze(1)  # padding and the last position never reach a head
    w = w[keep]
    labels = torch.cat([idx[:, 1:], idx[:, :1]], dim=1).view(-1)[keep]  # position t predicts token t+1
    teacher = None if teacher is None or crit.kd_weight == 0 else teacher.rows(keep)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the heads' matmuls in the autocast dtype, as nn.Linear's would be
        amp = torch.get_autocast_dtype(device)  # (the student's final norm gives fp32 under autocast)
        hidden = hidden.to(amp)
        if teacher is not None and teacher.hidden is not None:
            teacher = replace(teacher, hidden=teacher.hidden.to(amp))
    m = w if teacher is None or teacher.mask is None else w * teacher.mask.to(w.dtype)  # the KD rows
    w_ce, w_kd = w / w.sum().clamp(min=1.0), m / m.sum().clamp(min=1.0)  # an all-padding batch gives 0, not 0/0
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.requires_grad)
    return ChunkedKD.apply(hidden.reshape(B * T, C)[keep], head, labels, w_ce, w_kd, teacher, crit, need_grad)


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
        Wc = W.to(h.dtype)  # the head in h's dtype: the autocast dtype under autocast (distillation_loss casts h)
        tW = None if teacher is None or teacher.head is None else teacher.head[:V].to(teacher.hidden.dtype)
        ce, kd = torch.zeros(N, device=h.device), torch.zeros(N, device=h.device)
        gh = torch.empty_like(h) if need_grad else None
        gW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_grad else None
        # the (chunk, V) logits and gradient live in buffers made once and reused by every chunk
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
        if crit.kd_top_k:  # subset KD on a true union: a token in both top-k lists counts once
            k = min(crit.kd_top_k, s.shape[1])
            S = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
            S.scatter_(1, lt.topk(k, dim=-1).indices, True).scatter_(1, s_.topk(k, dim=-1).indices, True)
            ls, lt = ls.masked_fill(~S, float('-inf')), lt.masked_fill(~S, float('-inf'))  # renormalized on S
        T = crit.temperature
        d = losses.divergence(F.log_softmax(lt / T, dim=-1), F.log_softmax(ls / T, dim=-1), crit.kd_loss,
                              crit.jsd_beta, crit.skew_alpha)
        grad = torch.autograd.grad((w * d).sum(), s_)[0] if need_grad else None
    return d.detach(), grad
