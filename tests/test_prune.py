"""Pruning a student that holds the teacher's weights (prune.py): it keeps exactly the rows and columns it is
told to; its importances rank what carries the signal above what is zero; dropping a block that is an identity
changes nothing; and train.py runs, resumes and samples a pruned student.
Run: python -m pytest tests/test_prune.py"""
import pytest
import torch

import prune
from inherit import student_shape
from model import Indra, IndraConfig
from test_inherit import TEACHER_SIZES, save_teacher
from test_train import records, run, tiny_args

SHAPE = dict(vocab_size=50, block_size=16, n_layer=3, n_head=6, n_kv_head=2, n_embd=24, head_dim=8, mlp='swiglu',
             mlp_hidden=20, qkv_bias=True, tie_head=False)


def teacher_like(**kw):
    torch.manual_seed(0)
    model = Indra(IndraConfig(**{**SHAPE, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0 if 'norm' not in name else 1.0, 0.3)  # gains near 1, everything else random, biases too
    return model.eval()


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (n, 4, 16), generator=g)
    return [(x[i], None) for i in range(n)]


def test_pruning_keeps_exactly_the_rows_and_columns_it_is_told():
    big = teacher_like()
    kept = {'layers': [0, 2], 'channels': [1, 4, 5, 9, 10, 11, 20, 23], 'neurons': [[0, 3, 7, 19], [2, 5, 6, 8]],
            'groups': [[1], [0]]}
    args = {**SHAPE, 'n_layer': 2, 'n_head': 3, 'n_kv_head': 1, 'n_embd': 8, 'mlp_hidden': 4}
    small = prune.prune(big, args, kept)
    old, new = dict(big.named_parameters()), dict(small.named_parameters())
    c = kept['channels']
    assert torch.equal(new['wte.weight'], old['wte.weight'][:, c])
    assert torch.equal(new['lm_head.weight'], old['lm_head.weight'][:, c])
    assert torch.equal(new['norm_f.weight'], old['norm_f.weight'][c])
    # layer 0 keeps k/v group 1: query heads 3, 4, 5 (rows 24-47 of qkv), k head 1 (48 + 8-15), v head 1 (64 + 8-15)
    # layer 2 keeps group 0: query heads 0, 1, 2 (rows 0-23), k head 0 (rows 48-55), v head 0 (rows 64-71)
    for j, (i, q, k, v) in enumerate([(0, range(24, 48), range(56, 64), range(72, 80)),
                                      (2, range(0, 24), range(48, 56), range(64, 72))]):
        s, t, rows = f'blocks.{j}.', f'blocks.{i}.', [*q, *k, *v]
        assert torch.equal(new[s + 'attn.qkv.weight'], old[t + 'attn.qkv.weight'][rows][:, c])
        assert torch.equal(new[s + 'attn.qkv.bias'], old[t + 'attn.qkv.bias'][rows])
        assert torch.equal(new[s + 'attn.proj.weight'], old[t + 'attn.proj.weight'][c][:, list(q)])
        n = kept['neurons'][j]
        assert torch.equal(new[s + 'mlp.fc.weight'], old[t + 'mlp.fc.weight'][n + [20 + m for m in n]][:, c])
        assert torch.equal(new[s + 'mlp.proj.weight'], old[t + 'mlp.proj.weight'][c][:, n])
        for norm in ('norm1.weight', 'norm2.weight'):
            assert torch.equal(new[s + norm], old[t + norm][c])


def test_importance_ranks_what_carries_the_signal_above_what_is_zero():
    model = teacher_like()
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight[[5, 25]] = 0  # neuron 5 of layer 0: gate and up rows
        model.blocks[1].attn.qkv.weight[64 + 8:64 + 16] = 0  # layer 1, v head 1: its query heads 3-5 output 0
        model.blocks[1].attn.qkv.bias[64 + 8:64 + 16] = 0
        for block in model.blocks:  # channel 7: every norm's gain there is 0, so no block reads it
            block.norm1.weight[7] = block.norm2.weight[7] = 0
    scores = prune.importance(model, batches())
    assert scores['neurons'][0, 5] == 0 and scores['neurons'][0].topk(19).values.min() > 0
    assert scores['groups'][1, 1] == 0 and scores['groups'][1, 0] > 0 and (scores['groups'][[0, 2]] > 0).all()
    assert scores['channels'][7] == 0 and scores['channels'].topk(23).values.min() > 0
    kept = prune.choose(scores, model.config, {**SHAPE, 'n_embd': 23, 'mlp_hidden': 19, 'n_kv_head': 1}, ())
    assert 7 not in kept['channels'] and 5 not in kept['neurons'][0] and kept['groups'][1] == [0]


def test_dropping_a_block_that_is_an_identity_changes_nothing():
    """Block 1 with zero output projections adds nothing to the residual stream: Block Influence 0, so it is the
    one pruning drops, and the two-block student computes exactly what the three-block one did."""
    model = teacher_like()
    with torch.no_grad():
        model.blocks[1].attn.proj.weight.zero_()
        model.blocks[1].mlp.proj.weight.zero_()
    scores = prune.importance(model, batches())
    assert scores['ce'] == pytest.approx(prune.calibration_ce(model, batches()), abs=1e-6)  # the same pass's CE
    assert abs(scores['blocks'][1]) < 1e-6 and (scores['blocks'][[0, 2]] > 1e-3).all()  # cos(x, x) = 1 in float32
    args = {**SHAPE, 'n_layer': 2}
    kept = prune.choose(scores, model.config, args, ())
    assert kept['layers'] == [0, 2] and kept['channels'] == list(range(24)) and kept['groups'] == [[0, 1]] * 2
    small = prune.prune(model, args, kept).eval()
    x = batches()[0][0]
    assert torch.allclose(small(x)[0], model(x)[0], atol=1e-6)
    assert prune.calibration_ce(small, batches()) == pytest.approx(prune.calibration_ce(model, batches()), abs=1e-6)


def test_sizes_that_cannot_be_cut_from_the_teacher_are_one_line(tmp_path):
    save_teacher(tmp_path, 'llama', True)  # 2 layers, 6 query heads over 2 key/value heads of 8, 48 wide
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(tmp_path)
    for asked, words in [({'n_head': 4}, r'n_head must be 3 x n_kv_head'), ({'n_embd': 64}, r'--n_embd=64 but the '
                         r'teacher has n_embd=48'), ({'head_dim': 4}, 'pruning keeps each head whole'),
                         ({'n_layer': 1, 'keep_layers': [0, 1]}, r'--keep_layers=\[0, 1\] must name distinct')]:
        keep = asked.pop('keep_layers', ())
        with pytest.raises(SystemExit, match=words):
            student_shape(config, {**TEACHER_SIZES, **asked}, keep)
    _, args = student_shape(config, {**TEACHER_SIZES, 'n_head': 3}, ())
    assert (args['n_head'], args['n_kv_head'], args['n_layer']) == (3, 1, 2)  # one whole group, the other sizes kept


def test_a_pruned_run_trains_resumes_and_samples(tiny_teacher, tiny_data, tmp_path):
    """The tiny teacher (2 layers of 32, 4 query heads over 2 key/value heads, MLP 64) pruned to 1 layer of 24,
    one group, MLP 32: train.py prints what it kept, saves it, resumes the pruned shape and samples from it."""
    out = tmp_path / 'out'
    args = tiny_args(tiny_teacher, tiny_data, out, max_iters=4, eval_interval=2, init_from='teacher',
                     **{**TEACHER_SIZES, 'n_layer': 1, 'n_head': 2, 'n_embd': 24, 'mlp_hidden': 32}, prune_batches=2)
    stdout = run('train.py', *args)
    assert 'pruned to 1 of 2 layers' in stdout and '24 of 32 channels, 1 of 2 key/value groups' in stdout
    assert 'calibration CE on 512 training tokens' in stdout
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    kept = ckpt['inherited']['kept']
    assert len(kept['layers']) == 1 and len(kept['channels']) == 24 and ckpt['model_args']['n_embd'] == 24
    run('train.py', *args, '--max_iters=6', '--init_from=resume')
    assert [r['iter'] for r in records(out) if 'val_ce' in r] == [0, 2, 4, 6]
    assert run('sample.py', f'--ckpt={out / "best.pt"}', '--prompt=The king', '--max_new_tokens=5', '--num_samples=1')
