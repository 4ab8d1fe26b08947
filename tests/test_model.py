"""The student: tied weights, kernels equal at model level, checkpointing, generate, sampling filters.
Run: python -m pytest tests/test_model.py"""
import pytest
import torch

from checkpoint import load_checkpoint
from kvcache import KVCache
from matching import student_internals, with_weights
from model import Indra, IndraConfig, filter_logits
from optim import EMA


def tiny(**kw):
    cfg = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    torch.manual_seed(0)
    return Indra(IndraConfig(**cfg))


def test_head_is_tied_and_counted_once():
    m = tiny()
    assert m.lm_head.weight is m.wte.weight
    per_block = 2 * 32 + 32 * 96 + 32 * 32 + 2 * 32 * 128  # norms, qkv, proj, MLP
    assert m.num_params() == 97 * 32 + 2 * per_block + 32
    assert 'embedding (tied with head)' in m.param_report()


def test_swiglu_mlp_and_an_untied_head():
    """mlp='swiglu': proj(silu(gate x) * up x), gate and up stacked in fc; tie_head=False: a head of its own, whose
    matrix is counted (the embedding still is: both are parameters)."""
    m = tiny(mlp='swiglu', mlp_hidden=48, tie_head=False)
    mlp, x = m.blocks[0].mlp, torch.randn(3, 32)
    gate, up = mlp.fc.weight[:48], mlp.fc.weight[48:]
    assert torch.allclose(mlp(x), torch.nn.functional.silu(x @ gate.T) * (x @ up.T) @ mlp.proj.weight.T, atol=1e-6)
    assert m.lm_head.weight is not m.wte.weight and '(tied with head)' not in m.param_report()
    assert '+ head 0.00M' in m.param_report()
    per_block = 2 * 32 + 32 * 96 + 32 * 32 + 3 * 32 * 48
    assert m.num_params() == 2 * 97 * 32 + 2 * per_block + 32
    assert IndraConfig(n_embd=576, mlp='swiglu').mlp_hidden == 1536  # 8/3 x 576, rounded up to 64 (SmolLM2's)


def test_seed_recipe_size():
    """Seed 000: 12 x 768 with Qwen2.5's 151,936 logits and tied embeddings, about 206M (ours: 201.7M)."""
    m = Indra(IndraConfig(vocab_size=151936, block_size=256, n_layer=12, n_head=12, n_embd=768))
    assert 195e6 < m.num_params() < 210e6


def test_kernels_agree_at_model_level_with_padding():
    idx = torch.randint(97, (2, 16))
    am = torch.ones(2, 16, dtype=torch.long)
    am[0, :5] = 0
    a, _ = tiny(attn_impl='reference')(idx, am)
    b, _ = tiny(attn_impl='sdpa')(idx, am)
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    idx = torch.randint(97, (2, 16))
    grads = []
    for ckpt in (False, True):
        m = tiny(gradient_checkpointing=ckpt)
        _, loss = m(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_targets_loss_is_cross_entropy_and_ignores_minus_one():
    m = tiny()
    idx = torch.randint(97, (2, 10))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1
    logits, loss = m(idx, targets=targets)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), idx[:, 1:].reshape(-1))
    assert torch.allclose(loss, want, atol=1e-6)


def test_generate_stops_at_eos_and_pads_finished_rows():
    m = tiny()
    with torch.no_grad():  # make token 5 overwhelmingly likely: every row emits eos at once
        m.wte.weight[5] = m.norm_f.weight.sign() * 50
    out = m.generate(torch.randint(97, (3, 4)), max_new_tokens=20, temperature=1.0, eos_id=5)
    assert out.shape == (3, 5) and (out[:, -1] == 5).all()


def test_generate_greedy_is_deterministic_and_respects_block_size():
    m = tiny(block_size=8)
    idx = torch.randint(97, (1, 6))
    a = m.generate(idx, 12, temperature=0)
    b = m.generate(idx, 12, temperature=0)
    assert a.shape == (1, 18) and torch.equal(a, b)


STUDENTS = {'plain': {}, 'grouped, biases, swiglu': dict(n_head=4, n_kv_head=2, qkv_bias=True, mlp='swiglu')}


@pytest.mark.parametrize('attn_impl', ['sdpa', 'reference'])
@pytest.mark.parametrize('shape', sorted(STUDENTS))
def test_the_key_value_cache_gives_the_full_forward(shape, attn_impl):
    """hidden_states fed in pieces through a cache (the prompt, then one token at a time, then three) equals one
    forward over the whole sequence, row by row, with left padding (a row of 3 pads, one of none)."""
    m = tiny(attn_impl=attn_impl, **STUDENTS[shape]).eval()
    with torch.no_grad():  # random biases: a zero bias would hide a bias applied at the wrong position
        for b in m.blocks:
            if b.attn.qkv.bias is not None:
                b.attn.qkv.bias.normal_()
    idx, am = torch.randint(97, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    am[0, :3] = 0
    with torch.no_grad():
        full = m.hidden_states(idx, am)
        cache, parts = KVCache(m), []
        for a, b in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 12)]:
            parts.append(cache.hidden_states(idx[:, :b], am[:, :b]))  # the tokens a..b-1
    assert cache.slots[0]['k'].shape == (2, m.config.n_kv_head, 12, m.config.head_dim)  # kept before the GQA repeat
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


@pytest.mark.parametrize('shape', sorted(STUDENTS))
def test_generation_with_the_cache_is_generation_without_it(shape):
    """Token for token, greedy, over left-padded prompts with an eos, and past block_size (where the cache is
    dropped and the window slides)."""
    m = tiny(block_size=16, **STUDENTS[shape]).eval()
    with torch.no_grad():  # weights 10x their init: attention then decides the argmax (at init the embedding does)
        for p in m.parameters():
            p.mul_(10)
    idx, am = torch.randint(97, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    am[1, :2] = am[2, :4] = 0
    for new, eos in [(10, None), (10, int(m.generate(idx, 3, temperature=0, attention_mask=am)[0, -1])), (20, None)]:
        a = m.generate(idx, new, temperature=0, eos_id=eos, attention_mask=am)
        b = m.generate(idx, new, temperature=0, eos_id=eos, attention_mask=am, use_cache=False)
        assert torch.equal(a, b)
    assert a.shape == (3, 26)  # 6 + 20 > block_size 16: past it, uncached


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.96)).tolist() == [[True, True, True, True]]


def test_logit_clamp_bounds_the_head():
    m = tiny(logit_clamp=0.5)
    logits, _ = m(torch.randint(97, (2, 8)))
    assert logits.abs().max() < 0.5
    m.config.logit_clamp = 0.0
    assert m(torch.randint(97, (2, 8)))[0].abs().max() > 0.5


def test_ema_ramps_averages_and_swaps_back():
    m = tiny()
    ema = EMA(m, decay=0.999)
    w0 = m.wte.weight.detach().clone()
    with torch.no_grad():
        m.wte.weight.add_(1.0)
    ema.update(m)  # update 0: d = min(0.999, 1/10): the shadow moves 90% of the way
    assert torch.allclose(ema.shadow['wte.weight'], w0 + 0.9)
    assert 'lm_head.weight' not in ema.shadow  # the tied head is the embedding: one shadow, not two
    x = torch.randint(97, (1, 8))
    with ema.applied(m):
        assert torch.allclose(m.wte.weight, w0 + 0.9) and m.lm_head.weight is m.wte.weight
        with torch.no_grad():
            want = m(x)[0]
    assert torch.allclose(m.wte.weight, w0 + 1.0)  # the model's own weights are back
    ema.copy_to(m)
    assert torch.equal(m(x)[0], want)  # sample.py --ema: the same model as inside applied()


def test_ema_load_names_the_mismatching_parameter():
    """Seed 002 crashed at eval on an EMA that no longer fit the model: here loading says which tensor."""
    m = tiny()
    state = EMA(m, 0.99).state_dict()
    EMA(m, 0.99).load_state_dict(state)  # fits
    wrong = {**state, 'shadow': {**state['shadow'], 'blocks.1.mlp.fc.weight': torch.zeros(3, 3)}}
    with pytest.raises(ValueError, match=r'blocks\.1\.mlp\.fc\.weight has shape \(3, 3\), the model.s is \(128, 32\)'):
        EMA(m, 0.99).load_state_dict(wrong, 'ckpt.pt')
    half = {**state, 'shadow': {**state['shadow'], 'norm_f.weight': torch.ones(32, dtype=torch.float16)}}
    with pytest.raises(ValueError, match='norm_f.weight is torch.float16'):
        EMA(m, 0.99).load_state_dict(half)
    with pytest.raises(ValueError, match='has no wte.weight'):
        EMA(m, 0.99).load_state_dict({**state, 'shadow': {k: v for k, v in state['shadow'].items() if k != 'wte.weight'}})


@pytest.mark.parametrize('content,words', [
    (lambda good: good[:len(good) // 2], 'cannot be read'),  # truncated
    (lambda good: b'', 'cannot be read'),
    (lambda good: b'not a checkpoint at all' * 4, 'cannot be read'),
    (None, 'refusing'),  # pickled code
    ('plain', 'not a train.py checkpoint'),  # a bare state dict
])
def test_unreadable_checkpoints_are_one_clear_line(tmp_path, content, words):
    good = tmp_path / 'good.pt'
    torch.save({'model': tiny().state_dict(), 'model_args': {}, 'config': {}, 'iter_num': 0}, good)
    assert load_checkpoint(good)['iter_num'] == 0
    bad = tmp_path / 'bad.pt'
    if content is None:
        torch.save({'model': {}, 'model_args': {}, 'config': {}, 'iter_num': print}, bad)
    elif content == 'plain':
        torch.save(tiny().state_dict(), bad)
    else:
        bad.write_bytes(content(good.read_bytes()))
    with pytest.raises(SystemExit, match=words) as e:
        load_checkpoint(bad)
    assert str(bad) in str(e.value) and '\n' not in str(e.value)


def padded_batch(T=10):
    idx = torch.randint(97, (2, T))
    am = torch.ones(2, T, dtype=torch.long)
    am[0, :3] = 0  # left padding: queries 0-2 of row 0 see no real key
    am[1, 7:] = 0  # right padding
    return idx, am


def test_hidden_states_extras_match_a_manual_loop():
    from attention import additive_mask
    m = tiny(n_layer=3).eval()
    idx, am = padded_batch()
    h, extras = student_internals(m, idx, am, layers=(1, 3), attention_layers=(2, 3))
    assert torch.allclose(h, m.hidden_states(idx, am), atol=1e-6)  # blocks 2, 3 left the fused kernel: rounding
    assert sorted(extras['hidden']) == [1, 3] and sorted(extras['attention']) == [2, 3]
    mask = additive_mask(am, 10, 'cpu')
    x = m.wte(idx)
    for i, block in enumerate(m.blocks, start=1):
        a, att = with_weights(block.attn, block.norm1(x), mask)
        x = x + a
        x = x + block.mlp(block.norm2(x))
        if i in extras['hidden']:
            assert torch.allclose(extras['hidden'][i], x, atol=1e-6)
        if i in extras['attention']:
            assert torch.allclose(extras['attention'][i], att, atol=1e-6)
    visible = torch.ones(10, 10).tril().bool() & am.bool().view(2, 1, 1, 10)  # (B, 1, T, T)
    for att in extras['attention'].values():
        assert att.shape == (2, 2, 10, 10)
        assert (att.masked_select(~visible) == 0).all()
        assert torch.allclose(att.sum(-1), visible.any(-1).float().expand(2, 2, 10), atol=1e-6)
    with pytest.raises(ValueError, match=r'block 4 does not exist: blocks are numbered 1\.\.3'):
        student_internals(m, idx, am, layers=(4,), attention_layers=())


def test_hidden_states_extras_with_gradient_checkpointing():
    """A checkpointed block returns a tuple (output, weights): values and gradients as without checkpointing."""
    idx, am = padded_batch()
    results = []
    for ckpt in (False, True):
        m = tiny(gradient_checkpointing=ckpt).train()
        h, extras = student_internals(m, idx, am, layers=(1, 2), attention_layers=(1,))
        w = torch.linspace(-1, 1, 100).view(10, 10)
        loss = h.square().mean() + extras['hidden'][1].mean() + (extras['attention'][1] * w).sum()
        loss.backward()
        results.append((loss.detach(), extras['hidden'][2].detach(), torch.cat([p.grad.flatten() for p in m.parameters()])))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)
