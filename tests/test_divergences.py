"""kd_loss (forward_kl, reverse_kl, jsd, tvd, skew_kl), kd_top_k subset KD and the Teacher.mask KD rows:
reference_loss against the papers' formulas (float64, one row at a time), and DistillationLoss (the chunked loss)
against reference_loss, values and gradients, for every divergence. Run: python -m pytest tests/test_divergences.py"""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import KD_LOSSES, DistillationLoss, Teacher, divergence, reference_loss
from test_losses import MASKS, data, sparse_targets

KINDS = [('forward_kl', {}), ('reverse_kl', {}), ('jsd', {'jsd_beta': 0.5}), ('jsd', {'jsd_beta': 0.9}),
         ('tvd', {}), ('skew_kl', {'skew_alpha': 0.1}), ('skew_kl', {'skew_alpha': 0.6})]


def direct(p, q, kind, jsd_beta=0.5, skew_alpha=0.1):
    """The divergences as written in the papers, on probabilities p, q (V,) that are all > 0."""
    kl = lambda a, b: (a * (a / b).log()).sum()
    if kind == 'forward_kl':
        return kl(p, q)
    if kind == 'reverse_kl':
        return kl(q, p)
    if kind == 'jsd':
        m = jsd_beta * p + (1 - jsd_beta) * q
        return jsd_beta * kl(p, m) + (1 - jsd_beta) * kl(q, m)
    if kind == 'tvd':
        return 0.5 * (p - q).abs().sum()
    return kl(p, skew_alpha * p + (1 - skew_alpha) * q)


def per_row(h, W, th, tW, idx, am, lm, a, T, eps, kind, kd_top_k=0, kd_mask=None, clamp=0.0, **kw):
    """(loss, ce, kd) from full logits, a counted row at a time with the formulas above; kd_top_k's subset as a
    Python set union. The check of reference_loss, which every other test here holds the chunked loss to."""
    V = W.shape[0]
    s, t = h @ W.T, (th @ tW.T)[..., :V]
    if clamp:
        s = clamp * torch.tanh(s / clamp)
    ce, kd, n_kd = [], [], 0.0
    for b in range(idx.shape[0]):
        for i in range(idx.shape[1] - 1):
            if (am is not None and not (am[b, i] and am[b, i + 1])) or (lm is not None and not lm[b, i + 1]):
                continue
            ce.append(F.cross_entropy(s[b, i], idx[b, i + 1], label_smoothing=eps))
            sub = torch.arange(V)
            if kd_top_k:
                k = min(kd_top_k, V)
                union = set(t[b, i].topk(k).indices.tolist()) | set(s[b, i].topk(k).indices.tolist())
                sub = torch.tensor(sorted(union))
            m = 1.0 if kd_mask is None else float(kd_mask[b, i])
            kd.append(m * direct(torch.softmax(t[b, i, sub] / T, -1), torch.softmax(s[b, i, sub] / T, -1), kind, **kw))
            n_kd += m
    ce, kd = sum(ce) / max(len(ce), 1), sum(kd) / max(n_kd, 1.0)
    return (1 - a) * ce + a * T * T * kd, ce, kd


def settings(a, T, eps, kind, kd_top_k=0, clamp=0.0, **kw):
    """DistillationLoss's keyword arguments (and reference_loss's) for per_row's positional ones."""
    return dict(kd_weight=a, temperature=T, label_smoothing=eps, kd_loss=kind, kd_top_k=kd_top_k, logit_clamp=clamp,
                **kw)


def run(crit, h, W, th, tW, idx, am=None, lm=None, kd_mask=None, teacher=None):
    """The chunked loss and its gradients with respect to h and W."""
    h, W = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss, ce, kd = crit(h, W, idx, am, lm, teacher=teacher or Teacher(th, tW, mask=kd_mask))
    loss.backward()
    return loss, ce, kd, h.grad, W.grad


def assert_close(got, want, tol=1e-5):
    """Values and gradients: (loss, ce, kd, h.grad, W.grad) against the same from the reference."""
    for x, y in zip(got, want):
        assert torch.isfinite(x).all()
        atol = tol * max(y.abs().max().item(), 1e-3)
        assert torch.allclose(x.double(), y.double(), rtol=tol, atol=atol), (x - y).abs().max()


def with_grads(loss_fn, h, W, th, tW, idx, *args, **kw):
    """(loss, ce, kd, h.grad, W.grad) of loss_fn (per_row, or definition), to hold run()'s against."""
    h, W = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss, ce, kd = loss_fn(h, W, th, tW, idx, *args, **kw)
    loss.backward()
    return loss.detach(), ce.detach(), kd.detach(), h.grad, W.grad


def definition(h, W, th, tW, idx, am=None, lm=None, kd_mask=None, **kw):
    """reference_loss on the logits h @ W.T and th @ tW.T, with DistillationLoss's settings kw."""
    return reference_loss(h @ W.T, idx, am, lm, th @ tW.T, kd_mask, **kw)


@pytest.mark.parametrize('kd_top_k', [0, 3])
@pytest.mark.parametrize('kind,kw', KINDS)
def test_reference_loss_is_the_formula(kind, kw, kd_top_k):
    """The definition itself, float64, against per_row: padding, a loss mask, KD rows, label smoothing, a logit
    clamp, a teacher padded past V."""
    h, W, th, tW, idx = (x.double() if x.is_floating_point() else x for x in data(V=11, Vt=13))
    am, lm = MASKS
    kd_mask = torch.tensor([[1, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0, 1]])
    kwargs = settings(0.6, 2.0, 0.1, kind, kd_top_k, 3.0, **kw)
    got = with_grads(definition, h, W, th, tW, idx, am, lm, kd_mask, **kwargs)
    want = with_grads(per_row, h, W, th, tW, idx, am, lm, 0.6, 2.0, 0.1, kind, kd_top_k, kd_mask, 3.0, **kw)
    assert_close(got, want, tol=1e-10)
    assert got[2] > 1e-3  # a divergence worth comparing


@pytest.mark.parametrize('dtype,grad_tol', [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize('clamp', [0.0, 3.0])
@pytest.mark.parametrize('kd_top_k', [0, 3])
@pytest.mark.parametrize('kind,kw', KINDS)
def test_chunked_equals_reference_loss(kind, kw, kd_top_k, clamp, dtype, grad_tol):
    """DistillationLoss (chunked_loss.py) against reference_loss, for every divergence: loss, ce and kd to a relative
    1e-5, the gradients with respect to the student's hidden states and head to grad_tol (float64 1e-6, float32
    1e-5), with padding, a loss mask, KD rows (Teacher.mask), label smoothing, T != 1, a teacher padded past V and
    chunks of 4 rows. float64 inputs are not held tighter than 1e-6: the chunked loss keeps its row weights, its
    per-row CE and D, and the clamp's tanh in float32."""
    assert {k for k, _ in KINDS} == set(KD_LOSSES)
    h, W, th, tW, idx = (x.to(dtype) if x.is_floating_point() else x for x in data(B=3, L=9, V=11, Vt=13))
    am = torch.tensor([[1] * 9, [0, 0] + [1] * 7, [1] * 6 + [0] * 3])
    lm = torch.tensor([[0, 0] + [1] * 7, [1] * 9, [1, 1, 0, 1, 1, 1, 1, 1, 1]])
    kd_mask = torch.tensor([[1, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 0, 1, 1], [1] * 9])
    kwargs = settings(0.6, 2.5, 0.1, kind, kd_top_k, clamp, **kw)
    got = run(DistillationLoss(chunk_tokens=4, **kwargs), h, W, th, tW, idx, am, lm, kd_mask)
    want = with_grads(definition, h, W, th, tW, idx, am, lm, kd_mask, **kwargs)
    assert_close(got[:3], want[:3], tol=1e-5)
    assert_close(got[3:], want[3:], tol=grad_tol)
    assert got[2] > 1e-3  # a divergence worth comparing
    assert got[3].dtype == dtype and got[4].dtype == dtype


@pytest.mark.parametrize('kind,kw', [('forward_kl', {}), ('jsd', {'jsd_beta': 0.3})])
def test_kd_mask_averages_kd_over_its_own_rows(kind, kw):
    """CE over the counted tokens, KD over the counted tokens with mask 1; rows with mask 0 change nothing."""
    h, W, th, tW, idx = (x.double() if x.is_floating_point() else x for x in data())
    am, lm = MASKS
    kd_mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 0, 1]])
    crit = DistillationLoss(0.5, 2.0, kd_loss=kind, **kw)
    got = run(crit, h, W, th, tW, idx, am, lm, kd_mask)
    assert_close(got, with_grads(definition, h, W, th, tW, idx, am, lm, kd_mask, **settings(0.5, 2.0, 0.0, kind, **kw)))
    unmasked = run(crit, h, W, th, tW, idx, am, lm)
    assert abs(unmasked[2] - got[2]) > 1e-3 and unmasked[1] == got[1]  # the mask moves KD, not CE
    th2 = th.clone()
    th2[kd_mask == 0] = 100 * torch.randn(int((kd_mask == 0).sum()), th.shape[-1], dtype=th.dtype)
    assert_close(run(crit, h, W, th2, tW, idx, am, lm, kd_mask), got)
    none = run(crit, h, W, th, tW, idx, am, lm, torch.zeros_like(kd_mask))  # no KD rows: KD is 0, not 0/0
    assert none[2] == 0 and none[0].item() == pytest.approx(0.5 * got[1].item(), rel=1e-6)


def test_kd_mask_with_cached_targets_equals_live():
    h, W, th, tW, idx = data(V=11)
    kd_mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 0, 1]])
    ids, logp = sparse_targets(th @ tW.T, 2.0, k=11)
    crit = DistillationLoss(0.7, 2.0)
    live = run(crit, h, W, th, tW, idx, kd_mask=kd_mask)
    assert_close(run(crit, h, W, th, tW, idx, teacher=Teacher(ids=ids, logp=logp, mask=kd_mask.view(-1))), live)


@pytest.mark.parametrize('kd_top_k', [0, 4])
@pytest.mark.parametrize('kind,kw', KINDS)
def test_identical_distributions_give_zero(kind, kw, kd_top_k):
    h, W, _, _, idx = (x.double() if x.is_floating_point() else x for x in data(V=23))  # float32 rounds log p at 1e-6
    loss, _, kd, gh, gW = run(DistillationLoss(1.0, 2.0, kd_loss=kind, kd_top_k=kd_top_k, **kw), h, W, h, W, idx)
    assert abs(kd.item()) < 1e-6 and abs(loss.item()) < 1e-5
    assert gh.abs().max() < 1e-5 and gW.abs().max() < 1e-5  # a minimum: no pull either way


@pytest.mark.parametrize('kd_top_k', [0, 3])
@pytest.mark.parametrize('kind,kw', KINDS)
def test_chunk_size_changes_nothing(kind, kw, kd_top_k):
    h, W, th, tW, idx = data(B=2, L=9, V=50, C=8)
    am = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    one, many = (run(DistillationLoss(0.5, 1.5, 0.1, chunk_tokens=c, kd_loss=kind, kd_top_k=kd_top_k, **kw),
                     h, W, th, tW, idx, am) for c in (1, 1000))
    assert_close(one, many)


def test_jsd_endpoints_are_the_kls_and_skew_zero_is_forward_kl():
    """jsd_beta = 0 and 1 are forward and reverse KL (GKD's definition); skew_alpha = 0 is forward KL. Through the
    loss, so the autograd path is held against forward KL's closed forms."""
    h, W, th, tW, idx = data(V=30)
    am, lm = MASKS
    fwd = run(DistillationLoss(0.5, 2.0), h, W, th, tW, idx, am, lm)
    rev = run(DistillationLoss(0.5, 2.0, kd_loss='reverse_kl'), h, W, th, tW, idx, am, lm)
    assert abs(fwd[2] - rev[2]) > 1e-2
    assert_close(run(DistillationLoss(0.5, 2.0, kd_loss='jsd', jsd_beta=0.0), h, W, th, tW, idx, am, lm), fwd)
    assert_close(run(DistillationLoss(0.5, 2.0, kd_loss='jsd', jsd_beta=1.0), h, W, th, tW, idx, am, lm), rev)
    assert_close(run(DistillationLoss(0.5, 2.0, kd_loss='skew_kl', skew_alpha=0.0), h, W, th, tW, idx, am, lm), fwd)


def test_jsd_over_beta_tends_to_the_kls():
    """Why the endpoints are the KLs. With m = q + beta (p - q), expanding log(1 + x) to second order:
        JSD_beta = beta KL(p || q) - beta^2 chi2(p || q) / 2 + O(beta^3),   chi2(p || q) = sum (p - q)^2 / q,
    and JSD_beta(p, q) = JSD_1-beta(q, p) gives the same at beta -> 1 with KL(q || p) and chi2(q || p).
    At beta = 1e-4: JSD / beta is within beta chi2 of the KL, and the derived beta chi2 / 2 explains all but 2% of
    the difference (what is left is O(beta^2))."""
    g = torch.Generator().manual_seed(0)
    log_p, log_q = (torch.log_softmax(torch.randn(4, 11, generator=g, dtype=torch.float64), -1) for _ in range(2))
    p, q = log_p.exp(), log_q.exp()
    beta = 1e-4
    for jsd, kl, chi2 in ((divergence(log_p, log_q, 'jsd', jsd_beta=beta), (p * (log_p - log_q)).sum(-1),
                           ((p - q) ** 2 / q).sum(-1)),
                          (divergence(log_p, log_q, 'jsd', jsd_beta=1 - beta), (q * (log_q - log_p)).sum(-1),
                           ((p - q) ** 2 / p).sum(-1))):
        gap = kl - jsd / beta
        assert (gap.abs() <= beta * chi2).all() and (gap > 0).all()
        assert ((gap - beta * chi2 / 2).abs() <= 0.02 * beta * chi2 / 2).all(), gap / (beta * chi2 / 2)


def test_zero_probabilities_give_finite_values_and_gradients():
    """-inf logits: a one-hot teacher, a student with zeros, a token neither has. Each D as the formula over the
    tokens with mass; a KL whose first argument has mass where the second has none is +inf."""
    inf = float('inf')
    t = torch.tensor([[0.0, -inf, -inf, -inf], [1.0, -inf, -inf, 2.0]], dtype=torch.float64)
    s = torch.tensor([[1.0, 2.0, -inf, 0.5], [-inf, 0.0, -inf, 1.0]], dtype=torch.float64, requires_grad=True)
    p, q = torch.softmax(t, -1), torch.softmax(s.detach(), -1)
    for kind, kw in KINDS:
        if kind == 'reverse_kl':  # q has mass where the one-hot p has none
            assert (divergence(t.log_softmax(-1), s.log_softmax(-1), kind) == inf).all()
            continue
        if kind == 'forward_kl':
            assert divergence(t.log_softmax(-1), s.log_softmax(-1), kind)[1] == inf  # p on token 0, q none
        d = divergence(t.log_softmax(-1), s.log_softmax(-1), kind, **kw)
        rows = [0] if kind == 'forward_kl' else [0, 1]
        d[rows].sum().backward()
        for r in rows:
            on = (p[r] > 0) | (q[r] > 0)
            pr, qr = p[r, on].clamp(min=1e-300), q[r, on].clamp(min=1e-300)  # 0 log 0 = 0 as 1e-300 log 1e-300
            assert d[r].item() == pytest.approx(direct(pr, qr, kind, **kw).item(), rel=1e-9, abs=1e-12), (kind, r)
        assert torch.isfinite(s.grad).all() and s.grad[rows].abs().sum() > 0, kind
        s.grad = None


def test_top_k_covering_the_vocabulary_equals_full_kd():
    h, W, th, tW, idx = data(V=17)
    for kind, kw in KINDS:
        full = run(DistillationLoss(0.5, 2.0, kd_loss=kind, **kw), h, W, th, tW, idx)
        for k in (17, 100):
            assert_close(run(DistillationLoss(0.5, 2.0, kd_loss=kind, kd_top_k=k, **kw), h, W, th, tW, idx), full)


def test_small_top_k_differs_and_is_finite():
    h, W, th, tW, idx = data(V=40, C=8)
    for kind, kw in KINDS:
        full = run(DistillationLoss(0.5, 2.0, kd_loss=kind, **kw), h, W, th, tW, idx)
        sub = run(DistillationLoss(0.5, 2.0, kd_loss=kind, kd_top_k=2, **kw), h, W, th, tW, idx)
        assert all(torch.isfinite(x).all() for x in sub)
        assert abs(sub[2] - full[2]) > 1e-3 and (sub[3] - full[3]).abs().max() > 1e-3, kind


def test_top_k_union_by_hand():
    """V = 5, k = 2: the teacher's top-2 is {0, 1}, the student's {1, 2}; the union {0, 1, 2} counts token 1 once
    (seed 002 concatenated the two lists and counted it twice)."""
    s = torch.tensor([0.0, 4.0, 3.0, 0.0, -1.0])
    t = torch.tensor([5.0, 4.0, 0.0, 1.0, -1.0])
    eye, idx = torch.eye(5), torch.tensor([[0, 0]])
    _, _, kd = DistillationLoss(1.0, 1.0, kd_top_k=2)(s.view(1, 1, 5).expand(1, 2, 5), eye, idx,
                                                    teacher=Teacher(t.view(1, 1, 5).expand(1, 2, 5), eye))
    zp, zq = math.exp(5) + math.exp(4) + 1, 1 + math.exp(4) + math.exp(3)
    p, q = [math.exp(5) / zp, math.exp(4) / zp, 1 / zp], [1 / zq, math.exp(4) / zq, math.exp(3) / zq]
    want = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert kd.item() == pytest.approx(want, rel=1e-5)
    twice = torch.tensor([0, 1, 1, 2])  # the double-counted subset gives another value: the check above can fail
    ps, qs = torch.softmax(t[twice], -1), torch.softmax(s[twice], -1)
    assert abs((ps * (ps / qs).log()).sum().item() - want) > 1e-2


def test_logit_clamp_and_bfloat16_on_the_autograd_path():
    """The autograd gradient is taken on the clamped logits c tanh(s / c), then goes through the bound; bf16 hidden
    states give the same loss and gradients to bf16's precision."""
    h, W, th, tW, idx = data(B=2, L=9, V=300, C=16, Ct=12)
    h = 4 * h  # logits of +-30 and beyond: the clamp matters
    crit = DistillationLoss(0.5, 2.0, chunk_tokens=5, logit_clamp=10.0, kd_loss='jsd', kd_top_k=20)
    got = run(crit, h, W, th, tW, idx)
    want = with_grads(definition, h.double(), W.double(), th.double(), tW.double(), idx,
                      **settings(0.5, 2.0, 0.0, 'jsd', 20, 10.0))
    assert_close(got, want)
    bf = run(crit, h.bfloat16(), W, th.bfloat16(), tW, idx)
    assert bf[3].dtype == torch.bfloat16
    assert_close(bf, got, tol=3e-2)


def test_bad_settings_raise_one_clear_error():
    for kw, msg in (({'kd_loss': 'kl'}, 'choose one of forward_kl, reverse_kl, jsd, tvd, skew_kl'),
                    ({'kd_loss': 'jsd', 'jsd_beta': 1.5}, r'jsd_beta=1.5 must be in \[0, 1\]'),
                    ({'kd_loss': 'skew_kl', 'skew_alpha': -0.1}, r'skew_alpha=-0.1 must be in \[0, 1\]'),
                    ({'kd_top_k': -1}, 'kd_top_k=-1 must be >= 0')):
        with pytest.raises(ValueError, match=msg):
            DistillationLoss(**kw)
    h, W, th, tW, idx = data()
    crit = DistillationLoss()
    crit.kd_loss = 'JSD'  # set after construction, as train.py sets kd_weight: forward checks too
    with pytest.raises(ValueError, match='choose one of'):
        crit(h, W, idx, teacher=Teacher(th, tW))
    ids, logp = sparse_targets(th @ tW.T, 2.0, k=4)
    for kw in ({'kd_loss': 'reverse_kl'}, {'kd_top_k': 8}):
        with pytest.raises(ValueError, match="only kd_loss='forward_kl' with kd_top_k=0: use teacher_targets='live'"):
            DistillationLoss(**kw)(h, W, idx, teacher=Teacher(ids=ids, logp=logp))
