"""The training-safety switches of train.py (seeds 001, 002, 003, 004), each checked where it acts:
EMA, KD-weight warmup, temperature schedule, logit clamp, non-finite step skipping, LR multipliers,
memory and speed in the log, the mode-collapse watch, optional loggers, plot.py.
Some runs happen in this process (runpy) so that a fault can be injected with monkeypatch.
Run: python -m pytest tests/test_safety.py"""
import importlib.util
import runpy
import signal
import subprocess
import sys

import pytest
import torch

import model as model_module
from monitor import collapsed, repetition
from test_train import HANG_S, ROOT, records, run, tiny_args


def train_here(args):
    """Run train.py in this process; returns its globals. Restores sys.argv and the signal handlers it sets."""
    saved = sys.argv, signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    sys.argv = ['train.py', *args]
    try:
        return runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')
    finally:
        sys.argv = saved[0]
        signal.signal(signal.SIGINT, saved[1])
        signal.signal(signal.SIGTERM, saved[2])


@pytest.fixture(scope='module')
def switched_run(tiny_teacher, tiny_data, tmp_path_factory):
    """One run with the schedules, EMA, logit clamp and an LR multiplier of 0 for the first block."""
    out = tmp_path_factory.mktemp('switches')
    stdout = run('train.py', *tiny_args(tiny_teacher, tiny_data, out, max_iters=10, eval_interval=5, ema_decay=0.9,
                                        kd_weight=0.5, kd_weight_start=0.1, kd_warmup_frac=0.2, temperature_start=4.0,
                                        temperature_end=1.0, logit_clamp=5.0, log_interval=1, watch_tokens=16,
                                        min_delta=100.0),  # best.pt stays the step-0 weights
                 "--lr_multipliers={'blocks.0.*': 0.0}")
    return out, stdout


def test_kd_warmup_and_temperature_schedule_per_step(switched_run):
    """Seed 004: KD weight 0.1 -> 0.5 over the first 20% (2 of 10 steps); seed 003: T from 4 down to 1."""
    out, _ = switched_run
    steps = [r for r in records(out) if 'loss' in r]
    assert [r['kd_weight'] for r in steps] == pytest.approx([0.1, 0.3] + [0.5] * 8)
    assert [r['temperature'] for r in steps] == pytest.approx([4 - 3 * i / 10 for i in range(10)])


def test_ema_is_evaluated_beside_the_weights_and_saved(switched_run):
    out, stdout = switched_run
    evals = [r for r in records(out) if 'val_ce' in r]
    assert all('ema_val_ce' in r for r in evals) and 'EMA val CE' in stdout
    assert evals[-1]['ema_val_ce'] != evals[-1]['val_ce']  # an average of past weights, not the weights
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['ema']['updates'] == 10
    assert not torch.equal(ckpt['ema']['shadow']['wte.weight'], ckpt['model']['wte.weight'].float())
    text = run('sample.py', f'--ckpt={out / "ckpt.pt"}', '--ema', '--max_new_tokens=5', '--num_samples=1')
    assert '(step 10, EMA weights)' in text


def test_lr_multiplier_zero_freezes_its_group(switched_run):
    """{'blocks.0.*': 0.0}: the first block keeps its initial weights, the second moves; groups are printed."""
    out, stdout = switched_run
    assert 'optimizer group: lr x0, weight decay 0.1' in stdout and 'optimizer group: lr x1, weight decay 0.1' in stdout
    first = torch.load(out / 'best.pt', weights_only=True)  # step 0 is always the first best
    assert first['iter_num'] == 0, 'the test needs the step-0 weights'
    last = torch.load(out / 'ckpt.pt', weights_only=True)['model']
    for name, w in last.items():
        assert torch.equal(w, first['model'][name]) == name.startswith('blocks.0.'), name


def test_logit_clamp_reaches_the_saved_model(switched_run):
    out, _ = switched_run
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['logit_clamp'] == 5.0
    m = model_module.Indra(model_module.IndraConfig(**ckpt['model_args']))
    m.load_state_dict(ckpt['model'])
    with torch.no_grad():
        m.wte.weight.mul_(100)  # logits far beyond the bound
        x = torch.randint(100, (1, 8))
        assert m(x)[0].abs().max() <= 5.0  # tanh saturates to exactly 1 in fp32
        m.config.logit_clamp = 0.0
        assert m(x)[0].abs().max() > 50.0


def test_memory_speed_and_mfu_in_every_record(switched_run):
    out, stdout = switched_run
    steps = [r for r in records(out) if 'loss' in r]
    for r in steps:
        assert r['rss_gib'] > 0.1 and r['samples_per_s'] > 0 and r['tokens_per_s'] == pytest.approx(
            r['samples_per_s'] * 64) and 0 < r['mfu'] < 1
    line = next(l for l in stdout.splitlines() if l.startswith('iter 3:'))
    assert all(w in line for w in ('samples/s', 'tok/s', 'MFU', 'rss', 'kd 0.50', 'T 3.10'))


def test_collapse_watch_logs_samples_at_every_eval(switched_run):
    out, stdout = switched_run
    evals = [r for r in records(out) if 'val_ce' in r]
    assert all(len(r['watch']) == 1 and 0 < r['watch_distinct_2'] <= 1 for r in evals)
    assert stdout.count('  watch: ') == len(evals)


def test_repetition_statistics_flag_collapse():
    assert repetition([7] * 20) == {'distinct_1': 1 / 20, 'distinct_2': 1 / 19, 'top_share': 1.0}
    assert collapsed(repetition([7] * 20))
    assert collapsed(repetition([3, 4] * 10))  # 'did did did': two tokens, two bigrams
    assert not collapsed(repetition(list(range(20))))
    s = repetition([1, 2, 3, 1, 2, 4])
    assert s['distinct_2'] == pytest.approx(4 / 5) and s['top_share'] == pytest.approx(2 / 6)


def test_collapsed_samples_print_a_loud_warning(tiny_teacher, tiny_data, tmp_path, monkeypatch, capsys):
    """A student that answers everything with one token (seed 001's '::::') gets the warning at each eval."""
    def one_token(self, idx, max_new_tokens, **kw):
        return torch.cat([idx, torch.full((idx.size(0), max_new_tokens), 5, device=idx.device)], dim=1)
    monkeypatch.setattr(model_module.Indra, 'generate', one_token)
    train_here(tiny_args(tiny_teacher, tiny_data, tmp_path / 'out', max_iters=2, eval_interval=1, plot=False))
    assert capsys.readouterr().out.count('!!! MODE COLLAPSE?') == 3


def inject_nan(monkeypatch, steps, accumulation=2):
    """Make the student's hidden states NaN on the first micro-step of the given optimizer steps (training only)."""
    original, calls = model_module.Indra.hidden_states, [0]

    def hidden_states(self, idx, attention_mask=None, *layers):
        h = original(self, idx, attention_mask, *layers)
        if self.training:
            step, calls[0] = calls[0] // accumulation, calls[0] + 1
            if steps == 'all' or step in steps:
                h = h * float('nan')
        return h
    monkeypatch.setattr(model_module.Indra, 'hidden_states', hidden_states)


def test_a_nan_loss_skips_exactly_that_step(tiny_teacher, tiny_data, tmp_path, monkeypatch):
    """3 clean steps, and 4 steps with a NaN in step 3, end with the same weights, optimizer state and EMA."""
    common = dict(decay_lr=False, eval_interval=100, ema_decay=0.9, watch_tokens=0, plot=False)
    clean = train_here(tiny_args(tiny_teacher, tiny_data, tmp_path / 'clean', max_iters=3, **common))
    inject_nan(monkeypatch, steps={3})
    hit = train_here(tiny_args(tiny_teacher, tiny_data, tmp_path / 'nan', max_iters=4, **common))
    steps = [r for r in records(tmp_path / 'nan') if 'loss' in r]
    assert [r['skipped'] for r in steps] == [0, 0, 0, 1] and steps[-1]['skipped_total'] == 1
    a, b = clean['model'].state_dict(), hit['model'].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(clean['ema'].shadow[k], hit['ema'].shadow[k]) for k in clean['ema'].shadow)
    sa, sb = clean['opt'].state_dict()['state'], hit['opt'].state_dict()['state']
    assert all(torch.equal(sa[i]['exp_avg'], sb[i]['exp_avg']) and torch.equal(sa[i]['step'], sb[i]['step']) for i in sa)


def test_too_many_skipped_steps_stop_the_run_and_keep_the_checkpoint(tiny_teacher, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    inject_nan(monkeypatch, steps='all')
    with pytest.raises(SystemExit, match=r'3 steps in a row \(up to step 2\) had a non-finite loss.*ckpt.pt holds the last'):
        train_here(tiny_args(tiny_teacher, tiny_data, out, max_iters=10, eval_interval=100, max_skipped_steps=3,
                             watch_tokens=0, plot=False))
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)  # the one written at step 0, intact
    assert ckpt['iter_num'] == 0 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def test_wandb_offline_or_one_line_without_it(tiny_teacher, tiny_data, tmp_path):
    args = tiny_args(tiny_teacher, tiny_data, tmp_path / 'out', max_iters=2, eval_interval=2, watch_tokens=0)
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), *args, '--wandb_log=True', '--wandb_mode=offline'],
                       capture_output=True, text=True, timeout=HANG_S)
    if importlib.util.find_spec('wandb') is None:
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            "indra: --wandb_log=True needs the wandb package: pip install wandb (or run with --wandb_log=False)"]
        assert not (tmp_path / 'out').exists()  # failed before writing anything
    else:
        assert r.returncode == 0, r.stderr[-2000:]
        assert list((tmp_path / 'out' / 'wandb').glob('offline-run-*/run-*.wandb'))


def test_aim_missing_is_one_line(tiny_teacher, tiny_data, tmp_path):
    if importlib.util.find_spec('aim') is not None:
        pytest.skip('aim is installed here; this test checks the message when it is not')
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), *tiny_args(tiny_teacher, tiny_data, tmp_path / 'o'),
                        '--aim_log=True'], capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith('indra: --aim_log=True needs the aim')


def test_plot_draws_every_panel(switched_run, tmp_path):
    """train.py drew training.png at each eval; plot.py redraws it from the log, cut-short last line and all."""
    out, _ = switched_run
    assert (out / 'training.png').stat().st_size > 20_000
    log = tmp_path / 'run'
    log.mkdir()
    (log / 'log.jsonl').write_text((out / 'log.jsonl').read_text() + '{"iter": 11, "lo')  # killed mid-line
    from plot import draw
    import matplotlib.pyplot as plt
    figures = []
    monkey_close = plt.close
    try:
        plt.close = lambda fig: figures.append(fig)
        draw(log)
    finally:
        plt.close = monkey_close
    axes = [a for a in figures[0].axes if a.get_title()]
    assert len(axes) == 6 and all(a.has_data() for a in axes), [a.get_title() for a in axes]
    labels = {t for a in figures[0].axes for t in a.get_legend_handles_labels()[1]}
    assert {'val CE', 'teacher val CE', 'val CE, EMA weights', 'KD weight', 'temperature', 'learning rate'} <= labels
    r = subprocess.run([sys.executable, str(ROOT / 'plot.py'), str(tmp_path / 'nowhere')], capture_output=True, text=True)
    assert r.returncode == 1 and 'usage: python plot.py OUT_DIR' in r.stderr


def test_curriculum_draws_the_shortest_examples_first(tiny_teacher, tiny_examples, tmp_path):
    """Padded example batches (attention and loss masks) train; with curriculum=0.5 of 10 steps, step i draws from
    the shortest 10% + 90% * i/5 of the examples, so its longest example is at most that pool's longest."""
    import numpy as np
    lengths = np.sort(np.fromfile(f'{tiny_examples}/train.idx', dtype=np.int64).reshape(-1, 2)[:, 1])
    common = dict(max_iters=10, eval_interval=10, watch_tokens=0, plot=False, gradient_accumulation_steps=1)
    run('train.py', *tiny_args(tiny_teacher, tiny_examples, tmp_path / 'on', curriculum=0.5, **common),
        '--watch_tokens=8')  # chat data: the collapse watch asks seed 001's three questions
    run('train.py', *tiny_args(tiny_teacher, tiny_examples, tmp_path / 'off', **common))
    on = [r for r in records(tmp_path / 'on') if 'loss' in r]
    off = [r for r in records(tmp_path / 'off') if 'loss' in r]
    for r in on[:5]:
        pool = int(np.ceil(len(lengths) * (0.1 + 0.9 * r['iter'] / 5)))
        assert r['longest'] <= lengths[pool - 1], (r['iter'], r['longest'], lengths[pool - 1])
    assert max(r['longest'] for r in on[:2]) < max(r['longest'] for r in off[:2])  # the switch changes what is drawn
    assert all(np.isfinite(r['loss']) and r['kl'] > 0 for r in on + off)
    evals = [r for r in records(tmp_path / 'on') if 'val_ce' in r]
    assert evals[-1]['val_ce'] < evals[0]['val_ce']
    assert [w['prompt'] for w in evals[-1]['watch']][1] == 'What is 25 + 17?'
