"""DistillationLoss (chunked, from hidden states) against reference_loss (plain autograd on full
logits), and known cases. Every divergence against reference_loss, and reference_loss against the
papers' formulas, are in test_divergences.py. Run: python -m pytest tests/test_losses.py"""
import pytest
import torch

import chunked_loss
from losses import DistillationLoss, Teacher, reference_loss


def data(B=2, L=7, V=11, Vt=None, C=6, Ct=5, seed=0):
    """Hidden states and heads for both models; logits = hidden @ head.T."""
    g = torch.Generator().manual_seed(seed)
    h, th = torch.randn(B, L, C, generator=g), torch.randn(B, L, Ct, generator=g)
    W, tW = torch.randn(V, C, generator=g), torch.randn(Vt or V, Ct, generator=g)
    idx = torch.randint(V, (B, L), generator=g)
    return h, W, th, tW, idx


MASKS = (torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]),
         torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 1, 1]]))


@pytest.mark.parametrize('kd_weight,T,smoothing', [(0.5, 2.0, 0.0), (0.9, 1.0, 0.1), (0.0, 3.0, 0.0), (1.0, 4.0, 0.0)])
def test_matches_reference_loss(kd_weight, T, smoothing):
    """The three values, at the ends of kd_weight too (0: CE only and kd 0; 1: KD only, CE still reported)."""
    h, W, th, tW, idx = data()
    am, lm = MASKS
    got = DistillationLoss(kd_weight, T, smoothing)(h, W, idx, am, lm, Teacher(th, tW))
    want = reference_loss(h @ W.T, idx, am, lm, th @ tW.T, kd_weight=kd_weight, temperature=T,
                          label_smoothing=smoothing)
    for x, y in zip(got, want):
        assert x.item() == pytest.approx(y.item(), rel=1e-5, abs=1e-7)
    assert (got[2].item() == 0) == (kd_weight == 0)


@pytest.mark.parametrize('dtype,chunk,T', [(torch.float32, 1024, 2.5), (torch.float32, 4, 2.5), (torch.float32, 4, 1.0),
                                           (torch.bfloat16, 5, 2.5)])
def test_chunked_equals_reference_loss_values_and_gradients(dtype, chunk, T):
    """T = 1 is a path of its own: q_T is q, one softmax serves CE and KL."""
    h, W, th, tW, idx = data(B=3, L=9, V=700, Vt=768, C=16, Ct=12)  # row sub-chunks, a padded teacher
    am = torch.ones(3, 9, dtype=torch.long)
    am[0, :3] = 0
    am[2, 7:] = 0
    lm = torch.ones(3, 9, dtype=torch.long)
    lm[1, :4] = 0
    h, th = h.to(dtype), th.to(dtype)
    h1, W1 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    h2, W2 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss, _, _ = DistillationLoss(0.6, T, 0.1, chunk_tokens=chunk)(h1, W1, idx, am, lm, Teacher(th, tW))
    want, _, _ = reference_loss(h2 @ W2.to(dtype).T, idx, am, lm, th @ tW.to(dtype).T, kd_weight=0.6,
                                temperature=T, label_smoothing=0.1)
    (3 * loss).backward()
    (3 * want).backward()
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: logits and gradients are rounded to bf16
    assert loss.item() == pytest.approx(want.item(), rel=tol)
    assert h1.grad.dtype == dtype and W1.grad.dtype == torch.float32
    for a, b in ((h1.grad, h2.grad), (W1.grad, W2.grad)):
        assert torch.allclose(a.float(), b.float(), atol=tol * b.abs().max()), (a - b).abs().max()


def test_identical_distributions_give_zero_kl():
    h, W, _, _, idx = data()
    loss, ce, kl = DistillationLoss(kd_weight=1.0, temperature=2.0)(h, W, idx, teacher=Teacher(h.clone(), W.clone()))
    assert abs(kl.item()) < 1e-6 and abs(loss.item()) < 1e-5


def test_t_squared_convention():
    """kd_weight=1: loss = T^2 * KL at temperature T."""
    h, W, th, tW, idx = data()
    for T in (1.0, 2.0, 4.0):
        loss, _, kl = DistillationLoss(kd_weight=1.0, temperature=T)(h, W, idx, teacher=Teacher(th, tW))
        assert loss.item() == pytest.approx(T * T * kl.item(), rel=1e-6)


def test_masked_tokens_change_nothing():
    h, W, th, tW, idx = data()
    am = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    crit = DistillationLoss(0.5, 2.0)
    base = crit(h, W, idx, am, teacher=Teacher(th, tW))[0]
    h2, th2, idx2 = h.clone(), th.clone(), idx.clone()
    h2[0, 4:] += 100 * torch.randn(3, 6)  # garbage at padded positions
    th2[0, 4:] -= 50
    idx2[0, 4:] = 3
    assert torch.allclose(base, crit(h2, W, idx2, am, teacher=Teacher(th2, tW))[0])


def test_gradient_reaches_only_counted_positions():
    h, W, th, tW, idx = data()
    h.requires_grad_(True)
    am = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    DistillationLoss(0.5, 2.0)(h, W, idx, am, teacher=Teacher(th, tW))[0].backward()
    assert (h.grad[0, 2:] == 0).all()  # position 2 predicts pad token 3; the last position predicts nothing
    assert (h.grad[1, -1] == 0).all()
    assert h.grad[0, :2].abs().sum() > 0


def test_all_padding_batch_is_finite_and_zero():
    h, W, th, tW, idx = data()
    h.requires_grad_(True)
    loss, ce, kl = DistillationLoss(0.5, 2.0)(h, W, idx, torch.zeros(2, 7, dtype=torch.long), teacher=Teacher(th, tW))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(h.grad).all() and (h.grad == 0).all()


def test_ce_only_needs_no_teacher():
    h, W, _, _, idx = data()
    loss, ce, kl = DistillationLoss(kd_weight=0.0)(h, W, idx)
    s = h @ W.T
    want = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11), idx[:, 1:].reshape(-1))
    assert torch.allclose(loss, want) and kl.item() == 0


def sparse_targets(t, T, k):
    """The cache's format: teacher log-probs at temperature T on its top-k tokens."""
    logp = torch.log_softmax(t / T, -1)
    top = logp.topk(k, dim=-1)
    return top.indices, top.values


@pytest.mark.parametrize('T', [1.0, 2.0])
def test_sparse_targets_equal_dense_when_k_covers_the_vocabulary(T):
    h, W, th, tW, idx = data(V=11)
    ids, logp = sparse_targets(th @ tW.T, T, k=11)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    crit = DistillationLoss(0.7, T)
    dense = crit(h1, W, idx, teacher=Teacher(th, tW))[0]
    sparse = crit(h2, W, idx, teacher=Teacher(ids=ids, logp=logp))[0]
    dense.backward()
    sparse.backward()
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6)


@pytest.mark.parametrize('T', [1.0, 1.5])
def test_sparse_kl_and_gradient_equal_the_bucketed_formula(T):
    """top-k + tail bucket: KL over k tokens plus one bucket holding the rest of each distribution."""
    h, W, th, tW, idx = data(V=40, C=8)
    k = 6
    ids, logp = sparse_targets(th @ tW.T, T, k)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    loss, _, kl = DistillationLoss(1.0, T)(h1, W, idx, teacher=Teacher(ids=ids, logp=logp))
    log_q = torch.log_softmax(h2 @ W.T / T, -1)[:, :-1]
    ids_, logp_ = ids[:, :-1], logp[:, :-1]
    p_tail = 1 - logp_.exp().sum(-1)
    q_tail = 1 - log_q.gather(-1, ids_).exp().sum(-1)
    want_kl = (logp_.exp() * (logp_ - log_q.gather(-1, ids_))).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    (T * T * want_kl.mean()).backward()
    loss.backward()
    assert kl.item() == pytest.approx(want_kl.mean().item(), rel=1e-5)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)


def test_logit_clamp_equals_autograd_through_the_bound():
    """logit_clamp=c: the loss sees c tanh(s / c) (Indra.head applies the same), values and gradients as
    reference_loss; the bound keeps a gradient where a hard clamp(-c, c) would give none."""
    h, W, th, tW, idx = data(B=2, L=9, V=300, C=16, Ct=12)
    h = 4 * h  # logits of +-30 and beyond: the bound matters
    h1, W1 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    h2, W2 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss, _, _ = DistillationLoss(0.5, 2.0, chunk_tokens=5, logit_clamp=10.0)(h1, W1, idx, teacher=Teacher(th, tW))
    s = h2 @ W2.T
    assert s.abs().max() > 30
    want, _, _ = reference_loss(s, idx, teacher_logits=th @ tW.T, kd_weight=0.5, temperature=2.0,
                                logit_clamp=10.0)
    loss.backward()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for a, b in ((h1.grad, h2.grad), (W1.grad, W2.grad)):
        assert torch.allclose(a, b, atol=1e-5 * b.abs().max()), (a - b).abs().max()
    unclamped, _, _ = DistillationLoss(0.5, 2.0)(h, W, idx, teacher=Teacher(th, tW))
    assert abs(unclamped.item() - loss.item()) > 1.0  # the switch changes the loss: the test above is not vacuous


def test_autocast_runs_the_heads_in_its_dtype():
    """Under autocast the student's final norm hands over fp32 hidden states; the heads' matmuls must still run in
    the autocast dtype, as nn.Linear's would: the loss and the gradients equal those of bf16 inputs without
    autocast, and the fp32 inputs get fp32 gradients."""
    h, W, th, tW, idx = data(B=2, L=9, V=300, C=16, Ct=12)
    crit = DistillationLoss(0.6, 1.0, chunk_tokens=5)
    h1, W1 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    h2, W2 = h.bfloat16().requires_grad_(True), W.clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = crit(h1, W1, idx, teacher=Teacher(th, tW))[0]
    want = crit(h2, W2, idx, teacher=Teacher(th.bfloat16(), tW))[0]
    loss.backward()
    want.backward()
    assert loss.item() == want.item()
    assert h1.grad.dtype == torch.float32 and torch.equal(h1.grad, h2.grad.float())
    assert torch.equal(W1.grad, W2.grad)
    fp32 = crit(h, W, idx, teacher=Teacher(th, tW))[0]
    assert fp32.item() != loss.item()  # bf16 heads give another value: the test above is not vacuous


def test_no_grad_computes_no_gradient(monkeypatch):
    """An evaluation (torch.no_grad) with a head that requires grad, as train.py's is: the same values, and no
    gradient work (a Function's forward sees needs_input_grad set even under no_grad; the loss must not trust it)."""
    torch.manual_seed(0)
    h, W = torch.randn(2, 6, 8), torch.randn(20, 8, requires_grad=True)
    th, tW, idx = torch.randn(2, 6, 4), torch.randn(20, 4), torch.randint(20, (2, 6))
    crit = DistillationLoss(0.5, 1.0, chunk_tokens=5)
    want = crit(h, W, idx, teacher=Teacher(th, tW))
    asked = []
    real = chunked_loss.kd_rows
    monkeypatch.setattr(chunked_loss, 'kd_rows', lambda *a, **k: asked.append(k['need_grad']) or real(*a, **k))
    with torch.no_grad():
        got = crit(h, W, idx, teacher=Teacher(th, tW))
    assert asked == [False, False] and all(torch.equal(a, b) for a, b in zip(got, want))
    crit(h, W, idx, teacher=Teacher(th, tW))
    assert asked[2:] == [True, True]  # 10 counted rows, 2 chunks of 5
