"""checkpoint.py, called directly: the atomic writer, a snapshot that restores a run exactly (weights,
optimizer, EMA, every RNG), the checks a resume makes, and the log trimmed to what a checkpoint lived through.
The whole-run versions (resume after a kill, a signal, 2 ranks) are in test_recovery.py and test_scale.py.
Run: python -m pytest tests/test_checkpoint.py"""
import json
import random

import numpy as np
import pytest
import torch

from checkpoint import (atomic_file, load_checkpoint, open_run, restore, resume_shape, save, snapshot, trim_log,
                        write_atomic)
from model import Indra, IndraConfig
from optim import EMA

ARGS = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / 'f.bin'
    write_atomic(path, b'old')
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write(b'half of the new')
            raise RuntimeError('killed mid-write')
    assert path.read_bytes() == b'old' and [p.name for p in tmp_path.iterdir()] == ['f.bin']


def build(seed=0):
    torch.manual_seed(seed)
    model = Indra(IndraConfig(**ARGS))
    aux = torch.nn.ModuleDict({'features': torch.nn.Linear(16, 8)})
    opt = torch.optim.AdamW(list(model.parameters()) + list(aux.parameters()), lr=1e-2)
    parts = {'model': model, 'aux': aux, 'optimizer': opt, 'scaler': torch.amp.GradScaler('cpu', enabled=False),
             'ema': EMA(model, 0.9)}
    return parts


def step(parts, gen):
    """One training step that draws from every RNG a run draws from: the batch order, dropout, Python, NumPy."""
    x = torch.randint(50, (2, 16), generator=gen)
    noise = random.random() + np.random.rand()
    loss = parts['model'](x, targets=x)[1] + parts['aux']['features'](torch.ones(16)).sum() * noise * 1e-3
    loss.backward()
    parts['optimizer'].step()
    parts['optimizer'].zero_grad()
    parts['ema'].update(parts['model'])
    return loss.item()


def test_a_restored_snapshot_continues_exactly_as_the_run_would(tmp_path):
    parts, gen = build(), torch.Generator().manual_seed(1)
    for _ in range(3):
        step(parts, gen)
    progress = dict(iter_num=3, evaluated=True, best_val=2.5, bad_evals=1, skipped_total=0)
    save(tmp_path / 'ckpt.pt', snapshot(parts, progress, gen, False, model_args=ARGS, config={'seed': 0}))
    straight = [step(parts, gen) for _ in range(3)]

    fresh, fresh_gen = build(seed=7), torch.Generator().manual_seed(99)  # other weights, other RNG states
    torch.manual_seed(123), random.seed(5), np.random.seed(5)
    got = restore(load_checkpoint(tmp_path / 'ckpt.pt'), fresh, fresh_gen, False, 'ckpt.pt')
    assert got == progress
    assert [step(fresh, fresh_gen) for _ in range(3)] == straight  # dropout, batches and noise drawn alike
    for k, v in parts['model'].state_dict().items():
        assert torch.equal(v, fresh['model'].state_dict()[k]), k
    assert all(torch.equal(parts['ema'].shadow[k], fresh['ema'].shadow[k]) for k in parts['ema'].shadow)


def test_a_resume_must_match_what_was_saved(tmp_path):
    parts = build()
    save(tmp_path / 'ckpt.pt', snapshot(parts, dict(iter_num=0, evaluated=False, best_val=1.0, bad_evals=0,
                                                    skipped_total=0), torch.Generator(), False, model_args=ARGS,
                                        config={}))
    ckpt = load_checkpoint(tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit, match=r'holds a student with n_layer=2, n_embd=16 but this run asks for n_layer=3, '
                                         r'n_embd=32; resume with'):
        resume_shape(ckpt, {**ARGS, 'n_layer': 3, 'n_embd': 32}, 'ckpt.pt')
    args = resume_shape(ckpt, {**ARGS, 'n_layer': 0, 'n_kv_head': 2, 'dropout': 0.0}, 'ckpt.pt')
    assert (args['n_layer'], args['n_kv_head'], args['dropout']) == (2, 2, 0.0)  # 0: the checkpoint's; n_kv_head=2
    # is what its default (n_head) meant; dropout is no shape
    with pytest.raises(SystemExit, match=r'holds a student with n_kv_head=2 but this run asks for n_kv_head=1'):
        resume_shape(ckpt, {**ARGS, 'n_kv_head': 1}, 'ckpt.pt')
    with pytest.raises(SystemExit, match=r"holds a student with mlp=gelu but this run asks for mlp=swiglu"):
        resume_shape(ckpt, {**ARGS, 'mlp': 'swiglu'}, 'ckpt.pt')
    inherited = {**ckpt, 'inherited': {'teacher': 't', 'kept': None}}  # mlp, ... are then the checkpoint's
    assert resume_shape(inherited, {**ARGS, 'mlp': 'swiglu'}, 'ckpt.pt')['mlp'] == 'gelu'
    with pytest.raises(SystemExit, match=r'holds a student with block_size=16 but this run asks for block_size=32'):
        resume_shape(inherited, {**ARGS, 'block_size': 32}, 'ckpt.pt')  # its rotary phases stop at 16
    no_aux = {**build(), 'aux': torch.nn.ModuleDict()}
    with pytest.raises(SystemExit, match=r"trained with \['features'\] auxiliary modules, this run asks for none"):
        restore(ckpt, no_aux, torch.Generator(), False, 'ckpt.pt')
    no_ema = {**parts, 'ema': None}
    save(tmp_path / 'plain.pt', snapshot(no_ema, dict(iter_num=0, evaluated=False, best_val=1.0, bad_evals=0,
                                                      skipped_total=0), torch.Generator(), False, model_args=ARGS,
                                         config={}))
    with pytest.raises(SystemExit, match=r'has no EMA \(it was trained with ema_decay=0\)'):
        restore(load_checkpoint(tmp_path / 'plain.pt'), build(), torch.Generator(), False, 'plain.pt')


def test_a_run_directory_fits_its_init_from_or_is_one_line(tmp_path):
    assert open_run(tmp_path, 'scratch', False) is None  # empty: a fresh run may start
    with pytest.raises(SystemExit, match='--init_from=resume but .* does not exist; train from scratch first'):
        open_run(tmp_path, 'resume', False)
    (tmp_path / 'ckpt.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match='exists; continue it with --init_from=resume'):
        open_run(tmp_path, 'scratch', False)
    assert open_run(tmp_path, 'scratch', True) is None
    with pytest.raises(SystemExit, match='cannot be read'):
        open_run(tmp_path, 'resume', False)
    assert (tmp_path / 'ckpt.pt').read_bytes() == b'not a checkpoint'  # looked at, never touched


def test_the_log_keeps_what_the_checkpoint_lived_through(tmp_path):
    lines = [{'iter': 0, 'val_ce': 3.0}, {'iter': 0, 'loss': 2.0}, {'iter': 1, 'loss': 1.9}, {'iter': 2, 'val_ce': 2.9},
             {'iter': 2, 'loss': 1.8}, {'iter': 3, 'loss': 1.7}]
    (tmp_path / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines) + '{"iter": 4, "lo')
    trim_log(tmp_path, 2, evaluated=True)  # saved at step 2, after its evaluation: steps 2 and 3 run again
    assert [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()] == lines[:4]
    trim_log(tmp_path, 2, evaluated=False)
    assert len((tmp_path / 'log.jsonl').read_text().splitlines()) == 3
