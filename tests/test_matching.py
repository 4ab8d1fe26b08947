"""Feature and attention matching: layer pairs, the teacher's internals, the losses against direct formulas.
Run: python -m pytest tests/test_matching.py"""
import math

import pytest
import torch

from attention import additive_mask
from matching import FeatureMatcher, attention_loss, head_groups, layer_map, student_internals, teacher_internals
from model import Indra, IndraConfig


def padding_mask(B=2, T=6):
    am = torch.ones(B, T, dtype=torch.long)
    am[0, :2] = 0  # left padding: queries 0-1 of row 0 see no real key
    am[1, T - 1:] = 0  # right padding
    return am


def load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)


def test_layer_map_default_is_evenly_spaced_last_on_last():
    assert layer_map(6, 30) == [(1, 5), (2, 10), (3, 15), (4, 20), (5, 25), (6, 30)]
    assert layer_map(2, 2) == [(1, 1), (2, 2)]
    assert layer_map(4, 30) == [(1, 8), (2, 15), (3, 23), (4, 30)]  # 7.5 and 22.5 round up
    assert layer_map(6, 2) == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2)]  # never 0, the embeddings


def test_layer_map_override_is_checked():
    assert layer_map(6, 30, [[1, 0], [6, 30]]) == [(1, 0), (6, 30)]
    for pairs, words in [([[0, 5]], 'out of range'), ([[7, 5]], 'out of range'), ([[1, 31]], 'out of range'),
                         ([[1, -1]], 'out of range'), ([[1, 5], [1, 6]], 'block 1 is paired twice'),
                         ([[1, 5, 2]], 'not two integers'), ([[1]], 'not two integers'), ([1, 5], 'not two integers'),
                         ([[1, 5.0]], 'not two integers'), ([[True, 5]], 'not two integers'), ([], 'layer pairs'),
                         ('1:5', 'layer pairs')]:
        with pytest.raises(ValueError, match=words) as e:
            layer_map(6, 30, pairs)
        assert r'student_block in 1..6' in str(e.value) and 'teacher_layer in 0..30' in str(e.value)


def test_teacher_internals_hidden_states_and_attention(tiny_teacher):
    from teacher import teacher_hidden
    model = load(tiny_teacher)
    idx, am = torch.randint(100, (2, 6)), padding_mask()
    want = teacher_hidden(model, idx, am)  # before the switch to eager
    with torch.no_grad():
        last, extras = teacher_internals(model, idx, am, layers=(0, 1, 2), attention_layers=(1, 2))
    assert model.config._attn_implementation == 'eager'
    real = am.bool()
    assert torch.allclose(last[real], want[real], atol=1e-5)  # padded positions differ between sdpa and eager
    assert sorted(extras['hidden']) == [0, 1, 2] and all(h.shape == (2, 6, 32) for h in extras['hidden'].values())
    assert torch.equal(extras['hidden'][2], last)  # HF's last entry is the normed last_hidden_state
    assert sorted(extras['attention']) == [1, 2]
    visible = torch.ones(6, 6).tril().bool() & real.view(2, 1, 1, 6)
    for att in extras['attention'].values():
        assert att.shape == (2, 4, 6, 6)
        assert torch.allclose(att.sum(-1), torch.ones(2, 4, 6), atol=1e-5)
        assert (att.masked_select(~visible & real.view(2, 1, 6, 1)) == 0).all()  # real queries: visible keys only
    # no padding, one kind of request at a time
    last2, extras2 = teacher_internals(model, idx, None, attention_layers=(2,))
    assert extras2['hidden'] == {} and extras2['attention'][2].shape == (2, 4, 6, 6)
    assert teacher_internals(model, idx, None, layers=(1,))[1]['attention'] == {}


def test_teacher_internals_errors(tiny_teacher, monkeypatch):
    model = load(tiny_teacher)
    idx = torch.randint(100, (1, 5))
    with pytest.raises(ValueError, match=r'teacher layer 3 does not exist: hidden states are 0\.\.2'):
        teacher_internals(model, idx, layers=(3,))
    with pytest.raises(ValueError, match=r'teacher layer 0 does not exist.*attention layers 1\.\.2'):
        teacher_internals(model, idx, attention_layers=(0,))
    monkeypatch.setattr(model, 'set_attn_implementation', lambda impl: None)  # the switch does not happen
    with pytest.raises(RuntimeError, match='returned no attention weights'):
        teacher_internals(model, idx, attention_layers=(1,))


def features(seed=0, B=2, T=6, Cs=12, Ct=8):
    g = torch.Generator().manual_seed(seed)
    student = {1: torch.randn(B, T, Cs, generator=g), 3: torch.randn(B, T, Cs, generator=g)}
    teacher = {2: torch.randn(B, T, Ct, generator=g) * 5, 6: torch.randn(B, T, Ct, generator=g) * 50}
    return student, teacher


@pytest.mark.parametrize('kind', ['mse', 'cosine'])
def test_feature_matcher_equals_the_formula(kind):
    torch.manual_seed(0)
    pairs = [(1, 2), (3, 6)]
    fm = FeatureMatcher(pairs, 12, 8, kind=kind)
    student, teacher = features()
    am = padding_mask()
    per_pair = []
    for (s, t), proj in zip(pairs, fm.projections):
        terms = []
        for b in range(2):
            for i in range(6):
                if am[b, i]:
                    hs, ht = proj.weight @ student[s][b, i], teacher[t][b, i]
                    if kind == 'mse':
                        terms.append(((hs - ht / ht.square().mean().sqrt()) ** 2).mean())
                    else:
                        terms.append(1 - hs @ ht / (hs.norm() * ht.norm()))
        per_pair.append(sum(terms) / len(terms))
    assert torch.allclose(fm(student, teacher, am), sum(per_pair) / 2, atol=1e-5)
    assert torch.allclose(fm(student, teacher), fm(student, teacher, torch.ones(2, 6)))  # None: every token
    assert list(dict(fm.named_parameters())) == ['projections.0.weight', 'projections.1.weight']


def test_feature_matcher_ignores_padded_positions():
    torch.manual_seed(0)
    fm = FeatureMatcher([(1, 2), (3, 6)], 12, 8)
    student, teacher = features()
    am = padding_mask()
    before = fm(student, teacher, am)
    pad = am == 0
    student[1][pad] = 1e4
    student[3][pad] = float('nan')
    teacher[2][pad] = -1e4
    assert torch.equal(fm(student, teacher, am), before)


@pytest.mark.parametrize('kind', ['mse', 'cosine'])
def test_feature_matcher_is_zero_when_the_projection_is_exact(kind):
    """Teacher features of any per-token scale, a student whose projection lands on their RMS-normed direction."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 6, 8, generator=g)
    target = target / target.square().mean(-1, keepdim=True).sqrt()  # RMS 1 per token
    teacher = {2: target * torch.logspace(-1, 2, 12).view(2, 6, 1)}  # scales 0.1 .. 100
    fm = FeatureMatcher([(1, 2)], 12, 8, kind=kind)
    W = fm.projections[0].weight.detach()  # (8, 12), full row rank
    student = {1: target @ torch.linalg.pinv(W).T}  # W @ h_s = target
    assert fm(student, teacher).abs() < 1e-5
    assert fm({1: student[1] + 0.1}, teacher) > 1e-3  # and not zero otherwise


def test_feature_matcher_gradient_reaches_projections_and_student_not_teacher():
    torch.manual_seed(0)
    fm = FeatureMatcher([(1, 2), (3, 6)], 12, 8)
    student, teacher = features()
    for h in [*student.values(), *teacher.values()]:
        h.requires_grad_(True)
    fm(student, teacher, padding_mask()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fm.parameters())
    assert all(h.grad.abs().sum() > 0 for h in student.values())
    assert all(h.grad is None for h in teacher.values())
    with pytest.raises(ValueError, match='choose one of mse, cosine'):
        FeatureMatcher([(1, 2)], 12, 8, kind='l1')


@pytest.mark.parametrize('n_student,n_query,n_kv,want', [
    (6, 9, 3, [((0, 1), (0, 1, 2)), ((2, 3), (3, 4, 5)), ((4, 5), (6, 7, 8))]),  # per kv group
    (9, 9, 3, [((h,), (h,)) for h in range(9)]),  # per query head
    (18, 9, 3, [((2 * h, 2 * h + 1), (h,)) for h in range(9)]),
    (4, 4, 2, [((h,), (h,)) for h in range(4)]),
    (2, 4, 2, [((0,), (0, 1)), ((1,), (2, 3))]),
])
def test_head_groups(n_student, n_query, n_kv, want):
    assert head_groups(n_student, n_query, n_kv) == want


def test_head_groups_names_what_works():
    with pytest.raises(ValueError, match=r'n_head=4 .* 9 query heads over 3 key/value heads: use a multiple of 3 \(3, 6, 9'):
        head_groups(4, 9, 3)


def random_att(B, H, T, am, seed, zero_empty=True):
    """Causal, padding-masked attention distributions (B, H, T, T). A query with no visible key gets zeros
    (the student's convention) or, zero_empty=False, a distribution over all keys (what HF's eager gives)."""
    g = torch.Generator().manual_seed(seed)
    mask = additive_mask(am, T, 'cpu')
    empty = torch.isneginf(mask).all(-1, keepdim=True)
    att = torch.softmax(torch.randn(B, H, T, T, generator=g) * 2 + mask.masked_fill(empty, 0.0), dim=-1)
    return att.masked_fill(empty, 0.0) if zero_empty else att


def test_attention_loss_is_zero_when_the_grouped_patterns_agree():
    am = padding_mask()
    teacher = random_att(2, 4, 6, am, 0, zero_empty=False)
    same = {1: teacher.clone()}  # 4 student heads: one per query head
    assert attention_loss(same, {1: teacher}, [(1, 1)], am, n_kv_heads=2).abs() < 1e-6
    group_means = torch.stack([teacher[:, 0:2].mean(1), teacher[:, 2:4].mean(1)], 1)  # 2 heads: one per kv group
    assert attention_loss({1: group_means}, {1: teacher}, [(1, 1)], am, n_kv_heads=2).abs() < 1e-6
    one_of_each = teacher[:, [0, 2]]  # a head of the group, not its mean: not matched
    assert attention_loss({1: one_of_each}, {1: teacher}, [(1, 1)], am, n_kv_heads=2) > 1e-3


def test_attention_loss_equals_a_double_loop():
    am = padding_mask(T=5)
    student = {1: random_att(2, 2, 5, am, 1), 2: random_att(2, 2, 5, am, 2)}
    teacher = {1: random_att(2, 4, 5, am, 3, zero_empty=False), 2: random_att(2, 4, 5, am, 4, zero_empty=False)}
    pairs = [(1, 2), (2, 1)]
    per_pair = []
    for s, t in pairs:
        terms = []
        for b in range(2):
            for u in range(2):  # kv group u: teacher heads 2u, 2u+1; student head u
                for i in range(5):
                    if not am[b, i]:
                        continue
                    kl = 0.0
                    for j in range(5):
                        p = float(teacher[t][b, 2 * u:2 * u + 2, i, j].mean())
                        q = float(student[s][b, u, i, j])
                        if p > 0:
                            kl += p * math.log(p / q)
                    terms.append(kl)
        per_pair.append(sum(terms) / len(terms))
    got = attention_loss(student, teacher, pairs, am, n_kv_heads=2)
    assert abs(got.item() - sum(per_pair) / 2) < 1e-5


def test_attention_loss_ignores_padded_rows_and_stays_finite():
    am = padding_mask()
    teacher = {1: random_att(2, 4, 6, am, 0, zero_empty=False)}
    scores = torch.randn(2, 2, 6, 6, requires_grad=True)
    mask = additive_mask(am, 6, 'cpu')
    empty = torch.isneginf(mask).all(-1, keepdim=True)
    student = {1: torch.softmax(scores + mask.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)}  # rows of zeros
    loss = attention_loss(student, teacher, [(1, 1)], am, n_kv_heads=2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0
    padded_rows = (am == 0).view(2, 1, 6, 1)
    changed = {1: torch.where(padded_rows, random_att(2, 2, 6, torch.ones(2, 6), 9), student[1].detach())}
    assert torch.allclose(attention_loss(changed, teacher, [(1, 1)], am, 2), loss, atol=1e-7)
    assert torch.isfinite(attention_loss(student, teacher, [(1, 1)], torch.zeros(2, 6), 2))  # no real token at all


def test_one_step_on_feature_and_attention_matching_lowers_it(tiny_teacher):
    """End to end: the tiny teacher's internals, a tiny Indra student, one optimizer step."""
    teacher = load(tiny_teacher)
    tc = teacher.config
    torch.manual_seed(0)
    student = Indra(IndraConfig(vocab_size=tc.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16))
    pairs = layer_map(2, tc.num_hidden_layers)
    matcher = FeatureMatcher(pairs, 16, tc.hidden_size)
    s_layers, t_layers = [s for s, _ in pairs], [t for _, t in pairs]
    idx, am = torch.randint(100, (2, 8)), padding_mask(T=8)
    with torch.no_grad():
        _, t_in = teacher_internals(teacher, idx, am, layers=t_layers, attention_layers=t_layers)

    def loss():
        _, s_in = student_internals(student, idx, am, layers=s_layers, attention_layers=s_layers)
        return (matcher(s_in['hidden'], t_in['hidden'], am)
                + attention_loss(s_in['attention'], t_in['attention'], pairs, am, tc.num_key_value_heads))

    opt = torch.optim.Adam([*student.parameters(), *matcher.parameters()], lr=1e-2)
    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert torch.isfinite(before) and after < before - 1e-3, (before.item(), after.item())
