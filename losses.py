"""
The distillation loss, per token, masked, averaged over the tokens that count.

    loss = (1 - kd_weight) * CE(student, next token) + kd_weight * T^2 * KL(teacher_T || student_T)

Logits at position t predict token t+1, so the loss shifts by one and every mask is shifted
the same way. A prediction counts when its position and its target are real tokens
(attention_mask) and the target is marked by the optional loss_mask (e.g. only the
assistant's tokens). Which tokens count never comes from comparing ids with the pad id: pad
may equal eos (it does for the embedded teacher). The T^2 factor keeps the soft-target
gradients on the same scale as the hard ones when T changes (Hinton et al. 2015, sec. 2).

    crit = DistillationLoss(kd_weight=0.5, temperature=2.0)
    loss, ce, kl = crit(student_hidden, student_head_weight, idx, attention_mask, loss_mask,
                        teacher=Teacher(hidden=teacher_hidden, head=teacher_head_weight))

Why hidden states and not logits: the loss runs over tokens x vocabulary values (100M for
2,048 tokens of a 49,152-token vocabulary, 311M of Qwen's 151,936). As plain autograd ops on
full logits it holds several fp32 copies of that for both models and makes ~20 passes over
them: 3/4 of a CPU training step. Here the tokens that count are picked first (padding never
reaches a head), then a chunk of them at a time goes through the student's and the teacher's
heads, CE, KL and the gradient with respect to the logits are computed in one cache-sized
pass from the closed forms in kd_rows(), and the gradients of the hidden states and the head
are accumulated. No full (tokens, V) tensor exists for either model. tests/test_losses.py
holds it equal, values and gradients, to the plain autograd loss on full logits.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def counted_tokens(idx, attention_mask=None, loss_mask=None):
    """(B, T) float weights: 1 where the prediction at t of token t+1 counts, else 0 (always 0 at the last t)."""
    w = torch.zeros(idx.shape, device=idx.device)
    w[:, :-1] = 1.0
    if attention_mask is not None:
        w[:, :-1] *= attention_mask[:, :-1] * attention_mask[:, 1:]  # a real position predicting a real token
    if loss_mask is not None:
        w[:, :-1] *= loss_mask[:, 1:]  # the target token is one we train on
    return w


def pad_examples(data, mask, spans, max_len, pad_id):
    """A batch of examples (token arrays data and mask, (start, length) per example in spans), right-padded with
    pad_id to the longest (at most max_len): ids (B, L), attention mask (B, L) 1 on real tokens, loss mask (B, L)
    1 where mask marks a token to learn (the answer). counted_tokens() then counts answer targets only."""
    L = min(max_len, max(n for _, n in spans))
    x = torch.full((len(spans), L), pad_id, dtype=torch.long)
    am, lm = torch.zeros_like(x), torch.zeros_like(x)
    for b, (start, n) in enumerate(spans):
        n = min(n, L)
        x[b, :n] = torch.from_numpy(data[start:start + n].astype('int64'))
        am[b, :n] = 1
        lm[b, :n] = torch.from_numpy(mask[start:start + n].astype('int64'))
    return x, am, lm


@dataclass
class Teacher:
    """What the teacher says about N rows: its final hidden states and head (logits made chunk by chunk),
    or sparse targets from the cache (teacher.py --cache): log-probs at temperature T of k tokens per row."""
    hidden: torch.Tensor = None  # (N, Ct) or (B, T, Ct)
    head: torch.Tensor = None  # (Vt, Ct), Vt >= V: a teacher padded past its tokenizer is cut to the student's V
    ids: torch.Tensor = None  # (N, k) or (B, T, k) token ids
    logp: torch.Tensor = None  # (N, k) or (B, T, k) log-probabilities at the training temperature

    def rows(self, keep):
        """The same targets for the rows selected by the bool/index tensor keep."""
        take = lambda x: None if x is None else x.reshape(-1, x.shape[-1])[keep]
        return Teacher(take(self.hidden), self.head, take(self.ids), take(self.logp))


def kd_rows(s, labels, w, a, T, eps, t_logits=None, ids=None, logp=None, need_grad=True):
    """CE and KL per row of student logits s (n, V), and d(loss)/ds. Closed forms, with q = softmax(s),
    q_T = softmax(s / T), p = softmax(t / T), label smoothing eps over V classes, row weights w:
        CE  = -(1 - eps) log q[y] - eps/V sum_v log q[v]    dCE/ds  = q - (1 - eps) onehot(y) - eps/V
        KL  = sum_v p (log p - log q_T)                      dKL/ds  = (q_T - p) / T
        loss = sum_rows w ((1 - a) CE + a T^2 KL)            dloss/ds = w ((1 - a) dCE/ds + a T (q_T - p))
    Sparse teacher (ids, logp on k tokens S, the rest of its mass p_tail in one bucket):
        KL = sum_S p (log p - log q_T) + p_tail (log p_tail - log q_T,tail)
        dKL/ds = (q_T - p') / T, with p' = p on S and q_T * p_tail / q_T,tail off S.
    Works a few rows at a time so that each pass over V stays in cache."""
    n, V = s.shape
    dtype = torch.promote_types(s.dtype, torch.float32)
    ce, kl = torch.zeros(n, dtype=dtype, device=s.device), torch.zeros(n, dtype=dtype, device=s.device)
    grad = torch.empty(n, V, dtype=dtype, device=s.device) if need_grad else None
    step = max(1, 2 ** 18 // V)  # ~1 MB of fp32 per temporary
    for i in range(0, n, step):
        j = min(i + step, n)
        sc, y = s[i:j].to(dtype), labels[i:j, None]
        lse = sc.logsumexp(dim=-1, keepdim=True)
        ce[i:j] = (lse - sc.gather(1, y)).squeeze(1)
        if eps:
            ce[i:j] = (1 - eps) * ce[i:j] + eps * (lse.squeeze(1) - sc.mean(dim=-1))
        if a > 0:
            log_q = F.log_softmax(sc / T, dim=-1)
            if t_logits is not None:
                log_p = F.log_softmax(t_logits[i:j, :V].to(dtype) / T, dim=-1)
                p = log_p.exp()
                kl[i:j] = (p * (log_p - log_q)).sum(dim=-1)
            else:
                idc, lp = ids[i:j], logp[i:j].to(dtype)
                p_s = lp.exp()
                p_tail = (1 - p_s.sum(dim=-1)).clamp(min=0)
                log_q_s = log_q.gather(1, idc)
                # the student's tail mass from its k kept values alone (no pass over V) while it is not tiny;
                # a tiny tail loses its precision in 1 - sum, so then sum it directly (one masked pass)
                q_tail = (1 - log_q_s.double().exp().sum(dim=-1)).to(dtype)
                if (q_tail < 1e-3).any():
                    log_q_tail = log_q.scatter(1, idc, float('-inf')).logsumexp(dim=-1)
                else:
                    log_q_tail = q_tail.log()
                has_tail = (p_tail > 0) & torch.isfinite(log_q_tail)  # k = V leaves no tail, only rounding in p_tail
                tail = torch.where(has_tail, torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail, 0.0)
                kl[i:j] = (p_s * (lp - log_q_s)).sum(dim=-1) + tail
                r = torch.where(has_tail, (p_tail.clamp(min=1e-30).log() - log_q_tail).exp(), 0.0)  # p_tail / q_tail
        if need_grad:
            g = (sc - lse).exp_().mul_(1 - a).sub_((1 - a) * eps / V)  # (1 - a) (q - eps/V)
            g.scatter_add_(1, y, torch.full(y.shape, -(1 - a) * (1 - eps), dtype=dtype, device=s.device))
            if a > 0 and t_logits is not None:
                g.add_(log_q.exp_().sub_(p), alpha=a * T)
            elif a > 0:  # a T (q_T - p'): q_T (1 - r) everywhere, then on S add r q_T - p
                g.addcmul_(log_q.exp_(), (a * T * (1 - r))[:, None])
                g.scatter_add_(1, idc, a * T * (r[:, None] * log_q_s.exp() - p_s))
            grad[i:j] = g.mul_(w[i:j, None])
    return ce, kl, grad


class ChunkedKD(torch.autograd.Function):
    """The loss over N counted rows from hidden states h (N, C) and a head W (V, C), chunk by chunk;
    the gradients of h and W are computed in the forward pass and handed over in backward."""

    @staticmethod
    def forward(ctx, h, W, labels, w, a, T, eps, teacher, chunk, clamp):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        N, V = h.shape[0], W.shape[0]
        Wc = W.to(h.dtype)  # the head in the autocast dtype, as nn.Linear would use it
        tW = None if teacher is None or teacher.head is None else teacher.head[:V].to(teacher.hidden.dtype)
        ce, kl = torch.zeros(N, device=h.device), torch.zeros(N, device=h.device)
        gh = torch.empty_like(h) if need_grad else None
        gW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_grad else None
        for i in range(0, N, chunk):
            j = min(i + chunk, N)
            s = h[i:j] @ Wc.t()  # (n, V) student logits of this chunk
            if clamp > 0:  # bounded logits, as Indra.head gives them: c tanh(s / c)
                z = torch.tanh(s.float() / clamp)
                s = clamp * z
            if teacher is None:
                targets = {}
            elif tW is not None:
                targets = {'t_logits': teacher.hidden[i:j] @ tW.t()}  # (n, V) teacher logits of this chunk
            else:
                targets = {'ids': teacher.ids[i:j], 'logp': teacher.logp[i:j]}
            ce_c, kl_c, g = kd_rows(s, labels[i:j], w[i:j], a, T, eps, **targets, need_grad=need_grad)
            ce[i:j], kl[i:j] = ce_c, kl_c
            if need_grad:
                if clamp > 0:
                    g.mul_(1 - z * z)  # d(c tanh(s / c))/ds
                g = g.to(h.dtype)
                gh[i:j] = g @ Wc  # (n, C)
                gW += (g.t() @ h[i:j]).float()  # (V, C)
        loss = (w * ((1 - a) * ce + a * T * T * kl)).sum()
        ctx.save_for_backward(gh, gW)
        ctx.head_dtype = W.dtype
        ce, kl = (w * ce).sum(), (w * kl).sum()
        ctx.mark_non_differentiable(ce, kl)  # for logging only
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kl):
        gh, gW = ctx.saved_tensors
        return (gh * grad_loss.to(gh.dtype), (gW * grad_loss).to(ctx.head_dtype)) + (None,) * 8


class DistillationLoss(nn.Module):

    def __init__(self, kd_weight=0.5, temperature=2.0, label_smoothing=0.0, chunk_tokens=1024, logit_clamp=0.0):
        super().__init__()
        assert 0.0 <= kd_weight <= 1.0, f"kd_weight={kd_weight} must be in [0, 1]"
        assert temperature > 0, f"temperature={temperature} must be > 0"
        self.kd_weight, self.temperature, self.label_smoothing = kd_weight, temperature, label_smoothing
        self.chunk_tokens = chunk_tokens  # tokens per pass through the heads: bounds the (tokens, V) memory
        self.logit_clamp = logit_clamp  # > 0: the student's logits are c tanh(logits / c), as in Indra.head

    def forward(self, hidden, head, idx, attention_mask=None, loss_mask=None, teacher=None):
        """hidden (B, T, C) the student's final hidden states; head (V, C) its output head weight;
        idx (B, T) the input ids; attention_mask, loss_mask (B, T) of 0/1 or None;
        teacher: a Teacher over the same B*T positions, or None when kd_weight == 0.
        Returns (loss, ce, kl): the total to backprop and its two parts, detached, for logging
        (kl is the raw KL, without T^2; 0 when there is no teacher)."""
        B, T, C = hidden.shape
        assert teacher is not None or self.kd_weight == 0, "kd_weight > 0 needs a teacher"
        w = counted_tokens(idx, attention_mask, loss_mask).view(-1)
        keep = w.nonzero().squeeze(1)  # padding and the last position never reach a head
        w = w[keep] / w.sum().clamp(min=1.0)  # an all-padding batch gives loss 0, not 0/0
        labels = torch.cat([idx[:, 1:], idx[:, :1]], dim=1).view(-1)[keep]  # position t predicts token t+1
        teacher = None if teacher is None or self.kd_weight == 0 else teacher.rows(keep)
        return ChunkedKD.apply(hidden.reshape(B * T, C)[keep], head, labels, w, self.kd_weight, self.temperature,
                               self.label_smoothing, teacher, self.chunk_tokens, self.logit_clamp)
