"""The student: tied weights, kernels equal at model level, checkpointing, generate, sampling filters.
Run: python -m pytest tests/test_model.py"""
import torch

from model import Indra, IndraConfig, filter_logits


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


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.96)).tolist() == [[True, True, True, True]]
