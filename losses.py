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
        V = student_logits.size(-1)
        s = student_logits[:, :-1].float()  # (B, T-1, V) position t predicts token t+1
        labels = idx[:, 1:]
        w = counted_tokens(idx, attention_mask, loss_mask)
        n = w.sum().clamp(min=1.0)  # an all-padding batch gives loss 0, not 0/0

        ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), reduction='none',
                             label_smoothing=self.label_smoothing).view_as(w)
        ce = (ce * w).sum() / n
        if teacher_logits is None or self.kd_weight == 0:
            assert self.kd_weight == 0, "kd_weight > 0 needs teacher logits"
            return ce, ce.detach(), torch.zeros((), device=ce.device)

        assert teacher_logits.size(-1) >= V, f"teacher logits ({teacher_logits.size(-1)}) narrower than student ({V})"
        # A teacher padded past its tokenizer (Qwen: 151,936 logits, 151,665 tokens) is cut to the common width.
        t = teacher_logits[:, :-1, :V].float() / self.temperature
        log_p_t = F.log_softmax(t, dim=-1)
        log_p_s = F.log_softmax(s / self.temperature, dim=-1)
        # sum_v p_t * (log p_t - log p_s): KL(teacher || student) per token, (B, T-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction='none', log_target=True).sum(dim=-1)
        kl = (kl * w).sum() / n
        loss = (1 - self.kd_weight) * ce + self.kd_weight * self.temperature ** 2 * kl
        return loss, ce.detach(), kl.detach()
