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
    loss, ce, kl = crit(student_logits, teacher_logits, idx, attention_mask, loss_mask)

The loss runs over (tokens x vocabulary) values, 100M of them for 2,048 tokens of the
embedded teacher's 49,152-token vocabulary. Written as plain autograd ops it makes ~20 passes
over that memory and was 3/4 of a CPU training step. FusedKD instead walks a few rows at a
time (they stay in cache) and writes the gradient with respect to the student logits during
the forward pass, from the closed forms in its docstring: 5x faster on 2 CPU cores, and equal
to the plain autograd version (tests/test_losses.py holds them together).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def counted_tokens(idx, attention_mask=None, loss_mask=None):
    """(B, T-1) float weights: 1 where the prediction at t of token t+1 counts, else 0."""
    w = torch.ones(idx.shape[0], idx.shape[1] - 1, device=idx.device)
    if attention_mask is not None:
        w = w * attention_mask[:, :-1] * attention_mask[:, 1:]  # a real position predicting a real token
    if loss_mask is not None:
        w = w * loss_mask[:, 1:]  # the target token is one we train on
    return w


class FusedKD(torch.autograd.Function):
    """Per-row CE and KL for N rows of logits, and d(loss)/d(student logits) computed alongside.

    With q = softmax(s), q_T = softmax(s / T), p = softmax(t / T), label smoothing eps over V
    classes and a row weight w (1 / counted tokens, or 0):
        CE  = -(1 - eps) log q[y] - eps/V sum_v log q[v]    dCE/ds  = q - (1 - eps) onehot(y) - eps/V
        KL  = sum_v p (log p - log q_T)                      dKL/ds  = (q_T - p) / T
        loss = sum_rows w ((1 - a) CE + a T^2 KL)            dloss/ds = w ((1 - a) dCE/ds + a T (q_T - p))
    """

    @staticmethod
    def forward(ctx, s, t, labels, w, kd_weight, temperature, label_smoothing):
        # s: (N, V) student logits; t: (N, >=V) teacher logits or None; labels, w: (N,)
        N, V = s.shape
        a, T, eps = kd_weight, temperature, label_smoothing
        dtype = torch.promote_types(s.dtype, torch.float32)  # bf16/fp16 logits are upcast, chunk by chunk
        need_grad = ctx.needs_input_grad[0]  # evaluation runs under no_grad: skip the gradient
        grad = torch.empty_like(s) if need_grad else None
        ce, kl = torch.zeros(N, dtype=dtype, device=s.device), torch.zeros(N, dtype=dtype, device=s.device)
        rows = max(1, 2 ** 18 // V)  # ~1 MB of fp32 per temporary: the whole chunk stays in cache
        for i in range(0, N, rows):
            j = min(i + rows, N)
            sc, y = s[i:j].to(dtype), labels[i:j, None]
            lse = sc.logsumexp(dim=-1, keepdim=True)
            ce[i:j] = (lse - sc.gather(1, y)).squeeze(1)
            if eps:
                ce[i:j] = (1 - eps) * ce[i:j] + eps * (lse.squeeze(1) - sc.mean(dim=-1))
            if a > 0:
                log_p = F.log_softmax(t[i:j, :V].to(dtype) / T, dim=-1)
                log_q = F.log_softmax(sc / T, dim=-1)
                p = log_p.exp()
                kl[i:j] = (p * (log_p - log_q)).sum(dim=-1)
            if need_grad:
                g = (sc - lse).exp_().mul_(1 - a).sub_((1 - a) * eps / V)  # (1 - a) (q - eps/V)
                g.scatter_add_(1, y, torch.full(y.shape, -(1 - a) * (1 - eps), dtype=dtype, device=s.device))
                if a > 0:
                    g.add_(log_q.exp_().sub_(p), alpha=a * T)
                grad[i:j] = g.mul_(w[i:j, None])
        w = w.to(dtype)
        loss = (w * ((1 - a) * ce + a * T * T * kl)).sum()
        ctx.save_for_backward(grad)
        ce, kl = (w * ce).sum(), (w * kl).sum()
        ctx.mark_non_differentiable(ce, kl)  # for logging only
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


class DistillationLoss(nn.Module):

    def __init__(self, kd_weight=0.5, temperature=2.0, label_smoothing=0.0):
        super().__init__()
        assert 0.0 <= kd_weight <= 1.0, f"kd_weight={kd_weight} must be in [0, 1]"
        assert temperature > 0, f"temperature={temperature} must be > 0"
        self.kd_weight, self.temperature, self.label_smoothing = kd_weight, temperature, label_smoothing

    def forward(self, student_logits, teacher_logits, idx, attention_mask=None, loss_mask=None):
        """student_logits (B, T, V); teacher_logits (B, T, V') with V' >= V, or None when kd_weight == 0;
        idx (B, T) the input ids; attention_mask, loss_mask (B, T) of 0/1 or None.
        Returns (loss, ce, kl): the total to backprop and its two parts, detached, for logging
        (kl is the raw KL, without T^2; 0 when there is no teacher)."""
        B, T, V = student_logits.shape
        w = torch.zeros(B, T, device=idx.device)  # the last position predicts nothing: weight 0
        w[:, :-1] = counted_tokens(idx, attention_mask, loss_mask)
        w = w / w.sum().clamp(min=1.0)  # an all-padding batch gives loss 0, not 0/0
        labels = torch.cat([idx[:, 1:], idx[:, :1]], dim=1)  # position t predicts token t+1 (the last: a dummy)
        if teacher_logits is None:
            assert self.kd_weight == 0, "kd_weight > 0 needs teacher logits"
        else:
            # A teacher padded past its tokenizer (Qwen: 151,936 logits, 151,665 tokens) is cut to the common width.
            assert teacher_logits.size(-1) >= V, f"teacher logits ({teacher_logits.size(-1)}) narrower than student ({V})"
            teacher_logits = teacher_logits.reshape(B * T, -1)  # views, no copies of the big tensors
        return FusedKD.apply(student_logits.reshape(B * T, V), teacher_logits, labels.reshape(-1), w.reshape(-1),
                             self.kd_weight, self.temperature, self.label_smoothing)
