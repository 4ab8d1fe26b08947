"""DistillationLoss against a hand-written per-token reference and known cases.
Run: python -m pytest tests/test_losses.py"""
import math

import pytest
import torch

from losses import DistillationLoss


def reference(s, t, idx, am, lm, kd_weight, T, smoothing=0.0):
    """One token at a time, with Python floats."""
    B, L, V = s.shape
    total_ce = total_kl = 0.0
    n = 0
    for b in range(B):
        for i in range(L - 1):
            if am is not None and not (am[b, i] and am[b, i + 1]):
                continue
            if lm is not None and not lm[b, i + 1]:
                continue
            logp = torch.log_softmax(s[b, i].double(), -1)
            y = idx[b, i + 1]
            total_ce += -(1 - smoothing) * logp[y].item() - smoothing * logp.mean().item()
            pt = torch.softmax(t[b, i, :V].double() / T, -1)
            ps = torch.log_softmax(s[b, i].double() / T, -1)
            total_kl += sum(pt[v].item() * (math.log(pt[v].item()) - ps[v].item()) for v in range(V))
            n += 1
    ce, kl = total_ce / max(n, 1), total_kl / max(n, 1)
    return (1 - kd_weight) * ce + kd_weight * T * T * kl, ce, kl


def data(B=2, L=7, V=11, Vt=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=g) * 2
    t = torch.randn(B, L, Vt or V, generator=g) * 2
    idx = torch.randint(V, (B, L), generator=g)
    return s, t, idx


@pytest.mark.parametrize('kd_weight,T,smoothing', [(0.5, 2.0, 0.0), (0.9, 1.0, 0.1), (0.0, 3.0, 0.0), (1.0, 4.0, 0.0)])
def test_matches_per_token_reference(kd_weight, T, smoothing):
    s, t, idx = data()
    am = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    lm = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 1, 1]])
    loss, ce, kl = DistillationLoss(kd_weight, T, smoothing)(s, t, idx, am, lm)
    want, want_ce, want_kl = reference(s, t, idx, am, lm, kd_weight, T, smoothing)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert ce.item() == pytest.approx(want_ce, rel=1e-5)
    if kd_weight > 0:
        assert kl.item() == pytest.approx(want_kl, rel=1e-5, abs=1e-7)


def test_identical_distributions_give_zero_kl():
    s, _, idx = data()
    loss, ce, kl = DistillationLoss(kd_weight=1.0, temperature=2.0)(s, s.clone(), idx)
    assert abs(kl.item()) < 1e-6 and abs(loss.item()) < 1e-5


def test_t_squared_convention():
    """kd_weight=1: loss = T^2 * KL at temperature T."""
    s, t, idx = data()
    for T in (1.0, 2.0, 4.0):
        loss, _, kl = DistillationLoss(kd_weight=1.0, temperature=T)(s, t, idx)
        assert loss.item() == pytest.approx(T * T * kl.item(), rel=1e-6)


def test_masked_tokens_change_nothing():
    s, t, idx = data()
    am = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    crit = DistillationLoss(0.5, 2.0)
    base = crit(s, t, idx, am)[0]
    s2, t2, idx2 = s.clone(), t.clone(), idx.clone()
    s2[0, 4:] += 100 * torch.randn(3, 11)  # garbage at padded positions
    t2[0, 4:] -= 50
    idx2[0, 4:] = 3
    assert torch.allclose(base, crit(s2, t2, idx2, am)[0])


def test_gradient_reaches_only_counted_positions():
    s, t, idx = data()
    s.requires_grad_(True)
    am = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    DistillationLoss(0.5, 2.0)(s, t, idx, am)[0].backward()
    assert (s.grad[0, 2:] == 0).all()  # position 2 predicts pad token 3; the last position predicts nothing
    assert (s.grad[1, -1] == 0).all()
    assert s.grad[0, :2].abs().sum() > 0


def test_all_padding_batch_is_finite_and_zero():
    s, t, idx = data()
    s.requires_grad_(True)
    loss, ce, kl = DistillationLoss(0.5, 2.0)(s, t, idx, torch.zeros(2, 7, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_wider_teacher_is_cut_to_student_width():
    s, t, idx = data(V=11, Vt=16)  # teacher padded past the tokenizer, like Qwen's 151,936 logits
    loss, _, _ = DistillationLoss(0.7, 2.0)(s, t, idx)
    want, _, _ = reference(s, t, idx, None, None, 0.7, 2.0)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_ce_only_needs_no_teacher():
    s, _, idx = data()
    loss, ce, kl = DistillationLoss(kd_weight=0.0)(s, None, idx)
    want = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11), idx[:, 1:].reshape(-1))
    assert torch.allclose(loss, want) and kl.item() == 0


def plain_autograd(s, t, idx, am, lm, a, T, eps):
    """The loss as ordinary autograd ops, for the gradient check of the fused version."""
    V = s.size(-1)
    w = torch.ones(idx.shape[0], idx.shape[1] - 1)
    if am is not None:
        w = w * am[:, :-1] * am[:, 1:]
    if lm is not None:
        w = w * lm[:, 1:]
    sf = s[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(sf.reshape(-1, V), idx[:, 1:].reshape(-1), reduction='none',
                                           label_smoothing=eps).view_as(w)
    log_p = torch.log_softmax(t[:, :-1, :V].float() / T, -1)
    kl = (log_p.exp() * (log_p - torch.log_softmax(sf / T, -1))).sum(-1)
    return (w * ((1 - a) * ce + a * T * T * kl)).sum() / w.sum().clamp(min=1)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fused_gradient_equals_autograd(dtype):
    s, t, idx = data(B=3, L=9, V=700, Vt=768)  # several row chunks, a padded teacher
    am = torch.ones(3, 9, dtype=torch.long)
    am[0, :3] = 0
    am[2, 7:] = 0
    lm = torch.ones(3, 9, dtype=torch.long)
    lm[1, :4] = 0
    s, t = s.to(dtype), t.to(dtype)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    loss, _, _ = DistillationLoss(0.6, 2.5, 0.1)(s1, t, idx, am, lm)
    want = plain_autograd(s2, t, idx, am, lm, 0.6, 2.5, 0.1)
    (3 * loss).backward()
    (3 * want).backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the gradient itself is stored in bf16
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert s1.grad.dtype == dtype and torch.allclose(s1.grad.float(), s2.grad.float(), atol=tol * s2.grad.abs().max())
