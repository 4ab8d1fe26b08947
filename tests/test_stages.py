"""Stages: a run that starts from another run's checkpoint (init_from=path/to/ckpt.pt, inherit.from_checkpoint).
It starts from exactly that student (the same held-out CE, the same logits) with a fresh optimizer, schedule, step
counter and log; pruned, it keeps exactly the slices it records; it resumes exactly; its EMA starts from the loaded
weights (or the student is the checkpoint's EMA); it goes on with the checkpoint's data order; a student with its
own tokenizer keeps it and its projector. The bad inputs are rows of tests/test_recovery.py's BAD table. The stages
start from `first`: the tiny random teacher's own weights (a SwiGLU student with 4 query heads over 2 key/value
heads, 2 layers of 32, MLP 64) trained for 4 steps. Marked slow (about 80 s of train.py runs), to keep the
default run within its time; CI runs them.
Run: python -m pytest -m slow tests/test_stages.py"""
import shutil
from pathlib import Path

import pytest
import torch

import inherit
from checkpoint import load_checkpoint, load_student
from configurator import script_settings
from data import Data
from optim import EMA, cosine_lr
from teacher import load_teacher
from test_inherit import TEACHER_SIZES
from test_recovery import equal, same_records
from test_train import ROOT, records, run, tiny_args
from vocab import Projector

pytestmark = pytest.mark.slow
TRAIN = script_settings(ROOT / 'train.py')  # train.py's defaults
FIRST = dict(init_from='teacher', **TEACHER_SIZES, max_iters=4, eval_interval=2, ema_decay=0.9, watch_tokens=0,
             plot=False)
STAGE = dict(**TEACHER_SIZES, max_iters=4, eval_interval=2, lr_decay_iters=4, ema_decay=0.9, watch_tokens=0,
             plot=False)


@pytest.fixture(scope='module')
def first(tiny_teacher, tiny_data, tmp_path_factory):
    """The first stage: the teacher's weights, 4 steps, with an EMA."""
    out = tmp_path_factory.mktemp('first')
    run('train.py', *tiny_args(tiny_teacher, tiny_data, out, **FIRST))
    return out


@pytest.fixture(scope='module')
def second(first, tiny_teacher, tiny_data, tmp_path_factory):
    """The next stage from first's ckpt.pt (step 4), 4 steps with its own schedule and EMA: its out_dir and stdout."""
    out = tmp_path_factory.mktemp('second')
    stdout = run('train.py', *tiny_args(tiny_teacher, tiny_data, out, init_from=first / 'ckpt.pt', **STAGE))
    return out, stdout


def in_process(path, tiny_teacher, tiny_data, **settings):
    """What train.py's stage calls build, in this process: (the student in eval mode, its model_args, what it
    inherited, the stage as from_checkpoint leaves it for carry_over)."""
    config = {**TRAIN, 'teacher': tiny_teacher, 'data_dir': str(tiny_data), 'init_from': str(path), 'batch_size': 4,
              'block_size': 64, 'dtype': 'float32', **TEACHER_SIZES, **settings}
    stage = inherit.open_stage(config)
    _, tokenizer, enc = load_teacher(tiny_teacher)
    own_vocab = int(config['student_tokenizer'][3:] or 0)
    data = Data(tiny_data, tokenizer, enc, config['batch_size'], config['block_size'], 'cpu', own_vocab=own_vocab)
    model_args = inherit.run_args(config, data.vocab_size or load_checkpoint(path)['model_args']['vocab_size'])
    model, model_args, inherited = inherit.from_checkpoint(stage, config, data, model_args)
    return model.eval(), model_args, inherited, stage


def test_a_stage_starts_from_exactly_its_checkpoints_student(first, second, tiny_teacher, tiny_data):
    """Its step-0 val CE is the checkpoint run's last one (the same held-out batches, float32) and its logits are
    the checkpoint student's, also with a longer block_size; the optimizer, schedule, step counter and log are new;
    what it inherited names the teacher and the checkpoint, and a stage from a stage adds to it."""
    out, stdout = second
    assert f"student from {first / 'ckpt.pt'}: its weights at step 4, 2 layers of 32, 4 query heads over 2" in stdout
    assert 'resumed from' not in stdout
    last = [r for r in records(first) if 'val_ce' in r][-1]
    logged = records(out)
    assert last['iter'] == 4 and logged[0]['iter'] == 0 and logged[0]['val_ce'] == last['val_ce']
    steps = [r for r in logged if 'loss' in r]
    assert [r['iter'] for r in steps] == [0, 1, 2, 3]
    assert steps[0]['lr'] == cosine_lr(0, 3e-3, 3e-4, 5, 4) == 3e-3 / 6  # the warmup's first step
    ckpt = load_checkpoint(out / 'ckpt.pt')
    assert ckpt['iter_num'] == 4 and ckpt['config']['init_from'] == str(first / 'ckpt.pt')
    assert {s['step'].item() for s in ckpt['optimizer']['state'].values()} == {4.0}  # 4 steps, not 4 + 4
    assert ckpt['model_args']['mlp'] == 'swiglu' and ckpt['model_args']['n_kv_head'] == 2  # the checkpoint's shape
    assert ckpt['inherited'] == {'teacher': tiny_teacher, 'kept': None, 'stages': [
        {'checkpoint': str(first / 'ckpt.pt'), 'iter_num': 4, 'ema': False, 'kept': None}]}

    want, _ = load_student(first / 'ckpt.pt')
    x = torch.randint(0, want.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    for block_size in (64, 128):  # no weight depends on block_size: rotary phases are computed up to it
        model, args, _, _ = in_process(first / 'ckpt.pt', tiny_teacher, tiny_data, block_size=block_size)
        assert args['block_size'] == block_size
        with torch.no_grad():
            assert torch.equal(model(x)[0], want(x)[0])
    _, _, inherited, _ = in_process(out / 'ckpt.pt', tiny_teacher, tiny_data)  # a third stage
    assert inherited['teacher'] == tiny_teacher and [s['checkpoint'] for s in inherited['stages']] == [
        str(first / 'ckpt.pt'), str(out / 'ckpt.pt')]


def test_a_pruned_stage_keeps_exactly_the_slices_it_records(first, tiny_teacher, tiny_data, tmp_path):
    """The first stage's student (2 layers of 32, 4 query heads over 2 key/value heads, MLP 64) cut to 1 layer of 24,
    one group, MLP 32: the run prints what it kept and records it; the student built by the same code holds exactly
    the checkpoint's rows and columns at the recorded indices; the run resumes the pruned shape."""
    out = tmp_path / 'pruned'
    sizes = dict(n_layer=1, n_head=2, n_embd=24, mlp_hidden=32, prune_batches=2)
    args = tiny_args(tiny_teacher, tiny_data, out, init_from=first / 'ckpt.pt',
                     **{**STAGE, **sizes, 'max_iters': 2, 'ema_decay': 0.0})
    stdout = run('train.py', *args)
    assert 'pruned to 1 of 2 layers' in stdout and '24 of 32 channels, 1 of 2 key/value groups' in stdout
    assert "calibration CE on 512 training tokens" in stdout and "with the checkpoint's shape" in stdout
    ckpt = load_checkpoint(out / 'ckpt.pt')
    kept = ckpt['inherited']['stages'][-1]['kept']
    assert ckpt['model_args']['n_embd'] == 24 and ckpt['model_args']['n_kv_head'] == 1
    assert len(kept['layers']) == 1 and len(kept['channels']) == 24 and len(kept['neurons'][0]) == 32

    model, _, inherited, _ = in_process(first / 'ckpt.pt', tiny_teacher, tiny_data, **sizes)
    assert inherited['stages'][-1]['kept'] == kept  # the same calibration batches, the same choice
    old, new = load_checkpoint(first / 'ckpt.pt')['model'], dict(model.named_parameters())
    c = kept['channels']
    assert torch.equal(new['wte.weight'], old['wte.weight'][:, c])  # tied: the head too
    assert torch.equal(new['norm_f.weight'], old['norm_f.weight'][c])
    i, (g,), n = kept['layers'][0], kept['groups'][0], kept['neurons'][0]
    s, t, hs = 'blocks.0.', f'blocks.{i}.', 8  # the checkpoint's head_dim
    q = [h * hs + d for h in (2 * g, 2 * g + 1) for d in range(hs)]  # the group's 2 query heads
    kv = [32 + g * hs + d for d in range(hs)] + [48 + g * hs + d for d in range(hs)]  # its k head, then its v head
    assert torch.equal(new[s + 'attn.qkv.weight'], old[t + 'attn.qkv.weight'][q + kv][:, c])
    assert torch.equal(new[s + 'attn.proj.weight'], old[t + 'attn.proj.weight'][c][:, q])
    assert torch.equal(new[s + 'mlp.fc.weight'], old[t + 'mlp.fc.weight'][n + [64 + m for m in n]][:, c])
    assert torch.equal(new[s + 'mlp.proj.weight'], old[t + 'mlp.proj.weight'][c][:, n])
    for norm in ('norm1.weight', 'norm2.weight'):
        assert torch.equal(new[s + norm], old[t + norm][c])

    run('train.py', *args, '--max_iters=3', '--init_from=resume')
    assert [r['iter'] for r in records(out) if 'val_ce' in r] == [0, 2, 3]


def test_a_stage_resumes_exactly(first, second, tiny_teacher, tiny_data, tmp_path):
    """N steps straight == N/2, resume, N/2 for a stage whose settings still say 0 and gelu (its checkpoints say
    what it inherited, so the resume builds the checkpoint's shape): identical records, weights, EMA and optimizer."""
    straight, split = second[0], tmp_path / 'split'
    args = tiny_args(tiny_teacher, tiny_data, split, init_from=first / 'ckpt.pt', **STAGE)
    run('train.py', *args, '--max_iters=2')  # the same schedule (lr_decay_iters=4), stopped at its half
    stdout = run('train.py', *args, '--init_from=resume')
    assert 'at step 2' in stdout
    same_records(records(straight), records(split))
    a, b = (load_checkpoint(d / 'ckpt.pt') for d in (straight, split))
    assert equal(a['model'], b['model']) and equal(a['ema'], b['ema']) and equal(a['optimizer'], b['optimizer'])
    assert a['inherited'] == b['inherited']


def test_the_ema_starts_from_the_loaded_weights(first, second, tiny_teacher, tiny_data, tmp_path):
    """ema_decay > 0: the new EMA's shadow is the loaded weights at step 0 (its held-out CE is the student's);
    init_from_ema=True: the student is the checkpoint's EMA, whose held-out CE the first run measured."""
    assert records(second[0])[0]['ema_val_ce'] == records(second[0])[0]['val_ce']
    model, _, _, _ = in_process(first / 'ckpt.pt', tiny_teacher, tiny_data)
    shadow, saved = EMA(model, 0.9).shadow, load_checkpoint(first / 'ckpt.pt')
    assert all(torch.equal(shadow[k], saved['model'][k]) for k in shadow)

    model, _, inherited, _ = in_process(first / 'ckpt.pt', tiny_teacher, tiny_data, init_from_ema=True)
    assert inherited['stages'][-1]['ema'] is True
    assert all(torch.equal(p, saved['ema']['shadow'][k]) for k, p in model.named_parameters())
    assert not torch.equal(saved['ema']['shadow']['wte.weight'], saved['model']['wte.weight'])
    out = tmp_path / 'from_ema'
    stdout = run('train.py', *tiny_args(tiny_teacher, tiny_data, out, init_from=first / 'ckpt.pt', init_from_ema=True,
                                        **{**STAGE, 'max_iters': 1, 'eval_interval': 1}))
    assert 'its EMA at step 4' in stdout
    last = [r for r in records(first) if 'val_ce' in r][-1]
    assert records(out)[0]['val_ce'] == last['ema_val_ce']


def test_a_stage_goes_on_with_its_checkpoints_data_order(first, second, tiny_teacher, tiny_data, tmp_path):
    """The stage's first step trains on the batches the first run would have drawn next: its loss, CE, KL and
    gradient norm at step 0 are those of the first run resumed at its step 4 (the same weights, the same batches,
    no dropout, a constant KD weight and temperature), not a replay of the first run's first batches."""
    resumed = tmp_path / 'first_resumed'
    shutil.copytree(first, resumed)
    run('train.py', *tiny_args(tiny_teacher, tiny_data, resumed, **{**FIRST, 'max_iters': 5}), '--init_from=resume')
    went_on = next(r for r in records(resumed) if r['iter'] == 4 and 'loss' in r)
    stage = next(r for r in records(second[0]) if r['iter'] == 0 and 'loss' in r)
    for key in ('loss', 'ce', 'kl', 'grad_norm'):
        assert stage[key] == went_on[key], key
    _, _, _, opened = in_process(first / 'ckpt.pt', tiny_teacher, tiny_data)
    gen = torch.Generator().manual_seed(TRAIN['seed'])
    inherit.carry_over(opened, torch.nn.ModuleDict(), gen)
    assert torch.equal(gen.get_state(), load_checkpoint(first / 'ckpt.pt')['rng']['data'])
    assert not torch.equal(gen.get_state(), torch.Generator().manual_seed(TRAIN['seed']).get_state())


def test_a_student_with_its_own_tokenizer_keeps_it_and_its_projector(tiny_teacher, tiny_data, tmp_path):
    """A SwiGLU student on its own BPE (bpe512), 2 steps; the next stage reads the same tokenizer and starts with the
    checkpoint's projector: at step 0 the projector's held-out CE (teacher_val_ce) and the student's are those of the
    checkpoint's last evaluation. Pruned to 24 channels, the projector keeps the rows of the channels kept."""
    data = tmp_path / 'data'
    data.mkdir()
    for name in ('train.bin', 'val.bin', 'meta.json'):
        (data / name).write_bytes((Path(tiny_data) / name).read_bytes())
    own = dict(student_tokenizer='bpe512', mlp='swiglu', watch_tokens=0, plot=False, eval_interval=2)
    first = tmp_path / 'first'
    run('train.py', *tiny_args(tiny_teacher, data, first, max_iters=2, **own))
    out = tmp_path / 'second'
    stdout = run('train.py', *tiny_args(tiny_teacher, data, out, init_from=first / 'ckpt.pt', max_iters=1, **own))
    assert 'student tokenizer: byte-level BPE of 512 tokens' in stdout
    last, start = [r for r in records(first) if 'val_ce' in r][-1], records(out)[0]
    assert (start['val_ce'], start['teacher_val_ce']) == (last['val_ce'], last['teacher_val_ce'])

    saved = load_checkpoint(first / 'ckpt.pt')['aux']
    model, _, inherited, opened = in_process(first / 'ckpt.pt', tiny_teacher, data, n_layer=2, n_head=2, n_embd=24,
                                             student_tokenizer='bpe512', mlp='swiglu')
    aux = torch.nn.ModuleDict({'projector': Projector(32, 24)})
    inherit.carry_over(opened, aux, torch.Generator())
    c = inherited['stages'][-1]['kept']['channels']
    assert model.config.vocab_size == 512 and len(c) == 24
    assert torch.equal(aux['projector'].proj.weight, saved['projector.proj.weight'][c])
    assert torch.equal(aux['projector'].proj.bias, saved['projector.proj.bias'][c])
