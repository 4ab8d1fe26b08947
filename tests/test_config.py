"""configurator.py: config files then --key=value, with clear errors.
Run: python -m pytest tests/test_config.py"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configurator import configure

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {'batch_size': 8, 'learning_rate': 1e-3, 'teacher': 'smollm2-135m-instruct', 'compile': False}


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


@pytest.mark.parametrize('args,words', [
    (['--max_iter=2'], ['unknown config key', 'max_iters']),
    (['--max_iters=0'], ['max_iters', 'positive']),
    (['--dtype=float16', '--device=cpu'], ['float16', 'CPU']),
    (['--learning_rate=-1'], ['learning_rate']),
    (['config/does_not_exist.py'], ['not found']),
])
def test_train_rejects_bad_input_before_any_work(tmp_path, args, words):
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), f'--out_dir={tmp_path / "out"}', *args],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('indra:') and all(w in last for w in words), r.stderr
    assert 'Traceback' not in r.stderr and not (tmp_path / 'out').exists()


def test_unavailable_teacher_names_the_alternatives(tmp_path):
    """config/indra_agent.py's hub teacher, offline and not cached: one line naming --teacher= options."""
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf')}  # an empty cache
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), str(ROOT / 'config/indra_agent.py'),
                        f'--out_dir={tmp_path / "out"}'], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "Qwen/Qwen2.5-0.5B-Instruct" in last and '--teacher=smollm2-135m-instruct' in last, r.stderr
    assert not (tmp_path / 'out').exists()
