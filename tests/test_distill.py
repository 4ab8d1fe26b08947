"""The richer distillation switches of train.py, end to end on the tiny random teacher: divergences and top-k
subset KD, feature and attention matching, and a student with its own tokenizer (trained, resumed, evaluated
in bits per byte beside the teacher, sampled). The losses themselves are tested in test_divergences.py,
test_matching.py and test_vocab.py.
Run: python -m pytest tests/test_distill.py    (the own-tokenizer run is marked slow: -m slow)"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import HANG_S, records, run, tiny_args

ROOT = Path(__file__).resolve().parent.parent


def steps(out):
    return [r for r in records(out) if 'loss' in r]


def test_divergence_and_top_k_are_trained_and_logged(tiny_teacher, tiny_data, tmp_path):
    out = tmp_path / 'out'
    stdout = run('train.py', *tiny_args(tiny_teacher, tiny_data, out, kd_loss='jsd', jsd_beta=0.3, kd_top_k=16,
                                        max_iters=6, eval_interval=3))
    assert 'kl ' in stdout
    rows = steps(out)
    assert len(rows) == 6 and all(math.isfinite(r['kl']) and r['kl'] > 0 for r in rows)
    assert torch.load(out / 'ckpt.pt', weights_only=True)['config']['kd_loss'] == 'jsd'


def test_feature_and_attention_matching_train_log_and_resume(tiny_teacher, tiny_data, tmp_path):
    """Both parts are logged at every step, fall over a short run, and the projections are saved and resumed."""
    out = tmp_path / 'out'
    args = tiny_args(tiny_teacher, tiny_data, out, feature_weight=1.0, attention_weight=1.0, max_iters=20,
                     eval_interval=10, layer_map=[[1, 1], [2, 2]])
    stdout = run('train.py', *args)
    assert 'matching student blocks to teacher layers [(1, 1), (2, 2)]' in stdout
    rows = steps(out)
    assert all(k in r for r in rows for k in ('ce', 'kl', 'feature', 'attention'))
    assert rows[-1]['feature'] < rows[0]['feature'] and rows[-1]['attention'] < rows[0]['attention']
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert sorted(ckpt['aux']) == ['features.projections.0.weight', 'features.projections.1.weight']
    run('train.py', *args[:-1], '--max_iters=22', '--init_from=resume')
    assert [r['iter'] for r in steps(out)] == list(range(22))


@pytest.mark.parametrize('override, says', [
    ({'attention_weight': 1.0, 'n_head': 1}, 'n_head=1 cannot be matched'),
    ({'feature_weight': 1.0, 'layer_map': [[3, 1]]}, 'out of range'),
    ({'attention_weight': 1.0, 'layer_map': [[1, 0]]}, 'teacher layer 0 is the embeddings'),
])
def test_matching_that_cannot_work_names_the_fix(tiny_teacher, override, says):
    """Checked against the teacher's shape when matching is built (the settings alone are in test_config.py)."""
    from transformers import AutoConfig
    from matching import Matching
    s = {'n_layer': 2, 'n_head': 2, 'n_embd': 32, 'layer_map': [], 'feature_weight': 0.0, 'attention_weight': 0.0,
         **override}
    with pytest.raises(ValueError, match=says):
        Matching(s['n_layer'], s['n_head'], s['n_embd'], AutoConfig.from_pretrained(tiny_teacher), s['layer_map'],
                 s['feature_weight'], s['attention_weight'])


def test_bad_matching_stops_the_script_before_it_writes(tiny_teacher, tiny_data, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), *tiny_args(tiny_teacher, tiny_data, tmp_path / 'out',
                                                                           attention_weight=1.0, layer_map=[[1, 0]])],
                       capture_output=True, text=True, timeout=HANG_S)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and 'teacher layer 0 is the embeddings' in last and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path / 'out' / 'ckpt.pt').exists()


@pytest.mark.slow
def test_student_with_its_own_tokenizer(tiny_teacher, tiny_data, tmp_path):
    """student_tokenizer='bpe512': data prep trains the BPE, the student trains on its own tokens with KD from the
    projected teacher on aligned positions, the projector's CE falls, and eval.py puts it beside the teacher and a
    same-vocabulary student in bits per byte over the same bytes."""
    data = tmp_path / 'data'
    data.mkdir()
    for name in ('train.bin', 'val.bin', 'meta.json'):
        (data / name).write_bytes((Path(tiny_data) / name).read_bytes())
    out = tmp_path / 'own'
    stdout = run('train.py', *tiny_args(tiny_teacher, data, out, student_tokenizer='bpe512', kd_warmup_frac=0.2,
                                        lr_multipliers={'projector.*': 5.0}, max_iters=30, learning_rate=1e-2))
    assert 'student tokenizer: byte-level BPE of 512 tokens' in stdout and 'lr x5' in stdout
    assert (data / 'student-bpe512' / 'meta.json').exists()
    rows = steps(out)
    assert all(k in r for r in rows for k in ('ce', 'kl', 'projector_ce'))
    assert rows[0]['kd_weight'] == pytest.approx(0.1) and rows[-1]['kd_weight'] == pytest.approx(0.5)
    assert rows[-1]['projector_ce'] < rows[0]['projector_ce'] - 0.5  # the projector learns the student's tokens
    evals = [r for r in records(out) if 'val_ce' in r]
    assert evals[-1]['val_ce'] < evals[0]['val_ce'] - 0.5
    ckpt = torch.load(out / 'best.pt', weights_only=True)
    assert ckpt['model_args']['vocab_size'] == 512 and ckpt['student_tokenizer'] and 'projector.proj.weight' in ckpt['aux']

    plain = tmp_path / 'plain'
    run('train.py', *tiny_args(tiny_teacher, data, plain, max_iters=2, eval_interval=2))
    stdout = run('eval.py', '--ckpt', out / 'best.pt', plain / 'best.pt', '--dtype=float32', '--json', tmp_path / 'e.json')
    assert 'own tokenizer' in stdout
    result = json.loads((tmp_path / 'e.json').read_text())
    own, same = result['students']
    val_bytes = json.loads((data / 'student-bpe512' / 'meta.json').read_text())['val_bytes']
    for counted in (own['bytes'], result['teacher']['bytes']):  # the same text; a stream's first token is no target
        assert val_bytes - 16 <= counted < val_bytes
    assert own['kl'] is None and same['kl'] is not None
    assert own['bits_per_byte'] == pytest.approx(own['ce'] * own['tokens'] / (math.log(2) * own['bytes']))
    text = run('sample.py', f'--ckpt={out / "best.pt"}', '--prompt=The king', '--max_new_tokens=10', '--num_samples=1')
    assert 'The king' in text
