"""configurator.py: config files then --key=value, with clear errors; then train.py's settings checked as a
whole (check_settings, called directly here, and once through the script to show it runs before any work).
Run: python -m pytest tests/test_config.py"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configurator import check_settings, configure, script_settings
from test_train import HANG_S

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {'batch_size': 8, 'learning_rate': 1e-3, 'teacher': 'smollm2-135m-instruct', 'compile': False}
TRAIN = script_settings(ROOT / 'train.py')  # train.py's globals, read without running it


def test_values_are_parsed_not_executed(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("batch_size = 4\nteacher = 'a/b'\nimport math\n_private = 3\n")
    got = configure(DEFAULTS, [str(cfg), '--learning_rate=3', '--compile=True', '--teacher=/some/dir'])
    assert got == {'batch_size': 4, 'teacher': '/some/dir', 'learning_rate': 3.0, 'compile': True}
    assert type(got['learning_rate']) is float  # an int is accepted for a float and stored as one
    assert configure(DEFAULTS, ["--teacher=__import__('os').getcwd()"])['teacher'].startswith('__import__')


@pytest.mark.parametrize('argv,words', [
    (['--batch_sise=4'], ['unknown config key', 'batch_size', 'valid keys']),
    (['--batch_size=4.5'], ['batch_size', 'must be int']),
    (['--compile=1'], ['compile', 'must be bool']),
    (['--batch_size'], ['no value']),
    (['nope.py'], ['not found']),
])
def test_bad_input_is_one_clear_line(argv, words):
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, argv)
    msg = str(e.value)
    assert '\n' not in msg and all(w in msg for w in words), msg


def test_config_file_typo_is_caught(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("learning_rat = 1e-4\n")
    with pytest.raises(SystemExit, match="unknown config key 'learning_rat'"):
        configure(DEFAULTS, [str(cfg)])


def test_script_settings_are_train_pys_globals():
    assert TRAIN['batch_size'] == 8 and TRAIN['dtype'] == 'auto' and TRAIN['lr_multipliers'] == {}
    assert 'config_keys' not in TRAIN and 'skipped_in_a_row' not in TRAIN  # only the block between the rulers
    assert all(configure(TRAIN, [str(p)]) for p in (ROOT / 'config').glob('*.py'))  # every key they set is one


SETTINGS_BAD = [  # (override of train.py's defaults, words the one line must hold)
    ({'dtype': 'float16'}, '--dtype=float16 is for CUDA'),
    ({'dtype': 'fp8'}, "--dtype='fp8': choose auto"),
    ({'init_from': 'hub'}, "--init_from='hub': choose scratch or resume or teacher"),
    ({'init_from': 'out/best'}, "or the path of another run's checkpoint ending in .pt"),
    ({'init_from_ema': True}, '--init_from_ema=True starts from the EMA of the checkpoint --init_from names'),
    ({'keep_layers': [0, 2]}, "--keep_layers=[0, 2] names layers to keep"),
    ({'optimizer': 'sgd'}, "--optimizer='sgd': choose adamw or adamw8bit"),
    ({'total_batch_size': 1000, 'batch_size': 4, 'block_size': 64},
     'must be a positive multiple of batch_size x block_size = 256'),
    ({'learning_rate': 0.0}, 'learning_rate=0.0 must be > 0'),
    ({'learning_rate': -1.0}, 'learning_rate=-1.0 must be > 0'),
    ({'max_iters': 0}, '--max_iters=0 must be a positive integer'),
    ({'kd_weight': 1.5}, '--kd_weight=1.5 must be in [0, 1]'),
    ({'temperature': 0.0}, 'temperatures must be > 0'),
    ({'temperature_start': 4.0, 'teacher_targets': 'cache'}, 'a temperature schedule (--temperature_start) needs'),
    ({'ema_decay': 1.0}, '--ema_decay=1.0 must be in [0, 1)'),
    ({'lr_multipliers': {'blocks.*': -1}}, 'lr_multipliers maps name patterns to multipliers >= 0'),
    ({'feature_weight': 1.0, 'teacher_targets': 'cache'}, 'need --teacher_targets=live'),
    ({'kd_loss': 'kl'}, "--kd_loss='kl': choose one of"),
    ({'student_tokenizer': 'wordpiece'}, "--student_tokenizer='wordpiece'"),
    ({'student_tokenizer': 'bpe512', 'feature_weight': 1.0}, 'a student with its own tokenizer'),
    ({'feature_loss': 'l1', 'feature_weight': 1.0}, "--feature_loss='l1': choose mse or cosine"),
    ({'mlp': 'relu'}, "--mlp='relu': choose gelu or swiglu"),
    ({'n_layer': 0}, "--n_layer=0 must be a positive integer (0 means the teacher's with --init_from=teacher)"),
    ({'mlp_hidden': -1}, '--mlp_hidden=-1 must be a positive integer'),
    ({'n_head': 6, 'n_kv_head': 4}, '--n_head=6 must be a multiple of --n_kv_head=4'),
    ({'n_head': 6, 'n_embd': 390}, 'head_dim must be even: head_dim=0, n_embd=390, n_head=6'),
    ({'head_dim': 7}, 'head_dim must be even: head_dim=7'),
    ({'rope_base': 0.0}, '--rope_base=0.0 must be > 0'),
    ({'init_from': 'teacher', 'student_tokenizer': 'bpe512'}, "--init_from=teacher gives the student the teacher's"),
]


@pytest.mark.parametrize('override,words', SETTINGS_BAD, ids=[w for _, w in SETTINGS_BAD])
def test_settings_that_cannot_work_are_one_line(override, words):
    with pytest.raises(SystemExit) as e:
        check_settings({**TRAIN, **override})
    msg = str(e.value)
    assert msg.startswith('indra: ') and '\n' not in msg and words in msg, msg


def test_a_checkpoint_path_is_an_init_from_whose_sizes_may_be_0():
    sizes = {'n_layer': 0, 'n_head': 0, 'n_embd': 0}
    for init_from in ('out/best.pt', '/runs/stage 1/ckpt.pt'):
        check_settings({**TRAIN, **sizes, 'init_from': init_from, 'init_from_ema': True, 'keep_layers': [0, 3]})
    with pytest.raises(SystemExit, match=r'--n_layer=0 must be a positive integer'):
        check_settings({**TRAIN, **sizes})  # from scratch: sizes of its own


def test_settings_say_what_follows_from_them():
    config = {**TRAIN, 'total_batch_size': 8192, 'batch_size': 4, 'block_size': 256, 'lr_decay_iters': 300,
              'student_tokenizer': 'bpe512'}
    got = check_settings(config, world_size=2)
    assert config['gradient_accumulation_steps'] == 8 and got['micro_steps'] == 4
    assert got['own_vocab'] == 512 and got['schedule_iters'] == 300 and got['criterion'].kd_weight == TRAIN['kd_weight']
    with pytest.raises(SystemExit, match=r'shared among 3 ranks.*--gradient_accumulation_steps=9'):
        check_settings({**config, 'total_batch_size': 0}, world_size=3)
    with pytest.raises(SystemExit, match='cannot run once per rank'):
        check_settings({**TRAIN, 'teacher_device_map': 'auto'}, ddp=True)


@pytest.mark.parametrize('args,words', [
    (['--max_iter=2'], ['unknown config key', 'max_iters']),
    (['--max_iters=0'], ['max_iters', 'positive']),
    (['config/does_not_exist.py'], ['not found']),
])
def test_train_rejects_bad_input_before_any_work(tmp_path, args, words):
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), f'--out_dir={tmp_path / "out"}', *args],
                       capture_output=True, text=True, cwd=tmp_path, timeout=HANG_S)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('indra:') and all(w in last for w in words), r.stderr
    assert 'Traceback' not in r.stderr and not (tmp_path / 'out').exists()


def test_unavailable_teacher_names_the_alternatives(tmp_path):
    """config/indra_agent.py's hub teacher, offline and not cached: one line naming --teacher= options."""
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf')}  # an empty cache
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), str(ROOT / 'config/indra_agent.py'),
                        f'--out_dir={tmp_path / "out"}'], capture_output=True, text=True, env=env, timeout=HANG_S)
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "Qwen/Qwen2.5-0.5B-Instruct" in last and '--teacher=smollm2-135m-instruct' in last, r.stderr
    assert not (tmp_path / 'out').exists()
