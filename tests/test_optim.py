"""optim.py, called directly: parameter groups (every parameter in exactly one, decay on matrices only, LR
multipliers by name) and the schedules of a run. Run: python -m pytest tests/test_optim.py"""
import math

import pytest

from model import Indra, IndraConfig
from optim import cosine_lr, kd_weight_at, param_groups, temperature_at


def named():
    return list(Indra(IndraConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16)).named_parameters())


def test_every_parameter_in_exactly_one_group():
    params = named()
    groups = param_groups(params, 0.1, {'blocks.0.*': 0.5})
    ids = [id(p) for g in groups for p in g['params']]
    assert sorted(ids) == sorted(id(p) for _, p in params) and len(ids) == len(set(ids))
    assert {id(p) for g in groups if g['lr_mult'] == 0.5 for p in g['params']} == \
        {id(p) for n, p in params if n.startswith('blocks.0.')}
    by = {(g['lr_mult'], g['weight_decay']): g for g in groups}
    assert set(by) == {(0.5, 0.1), (0.5, 0.0), (1.0, 0.1), (1.0, 0.0)}
    assert all(p.dim() < 2 for g in groups if g['weight_decay'] == 0 for p in g['params'])


@pytest.mark.parametrize('multipliers,words', [
    ({'head.*': 2.0}, "pattern 'head.*' matches no parameter; names look like wte.weight"),
    ({'blocks.*': 2.0, 'blocks.0.*': 0.5}, "matches lr_multipliers patterns 'blocks.*' and 'blocks.0.*'"),
])
def test_bad_multipliers_are_one_line(multipliers, words):
    with pytest.raises(SystemExit) as e:
        param_groups(named(), 0.1, multipliers)
    assert words in str(e.value) and '\n' not in str(e.value)


def test_the_schedules():
    lr = [cosine_lr(it, 1e-3, 1e-4, warmup=4, total=20) for it in range(25)]
    assert lr[0] == pytest.approx(1e-3 / 5) and lr[3] == pytest.approx(1e-3 * 4 / 5)
    assert lr[4] == pytest.approx(1e-3) and lr[12] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 2)) * 9e-4)
    assert lr[20:] == [1e-4] * 5 and all(a >= b for a, b in zip(lr[4:], lr[5:]))
    assert cosine_lr(7, 1e-3, 1e-4, 4, 20, decay=False) == 1e-3
    assert [kd_weight_at(it, 0.7, 0.1, 0.2, 10) for it in (0, 1, 2, 9)] == pytest.approx([0.1, 0.4, 0.7, 0.7])
    assert [temperature_at(it, 2.0, 4.0, 1.0, 10) for it in (0, 5, 10, 20)] == pytest.approx([4.0, 2.5, 1.0, 1.0])
    assert temperature_at(5, 2.0, 0.0, 1.0, 10) == 2.0
