"""
data/shakespeare/prepare.py: token files that describe themselves and decode back to the plays; data.py's Data,
called directly: the checks on opening, and batches of a text stream and of padded examples.

  python -m pytest tests/test_data.py -q
"""

import json
import math
import re

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import teacher
import tokenizer
from conftest import load_prepare
from data import Data

prepare = load_prepare()


def read_split(out_dir, split):
    meta = json.loads((out_dir / 'meta.json').read_text())
    return np.fromfile(out_dir / f'{split}.bin', dtype=meta['dtype']), meta


def play_titles(ids, tok, eos):
    """The '# Title' line that opens each eos-terminated play."""
    cuts = np.flatnonzero(ids == eos)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(ids[s:s + 20].tolist()).split('\n')[0] for s in starts]


def test_token_files_round_trip(tiny_teacher, tiny_data):
    tok, enc = teacher.load_tokenizer(tiny_teacher)
    train, meta = read_split(tiny_data, 'train')
    val, _ = read_split(tiny_data, 'val')
    assert meta['teacher'] == tiny_teacher and meta['tokenizer'] == 'tiktoken'
    assert meta['tokenizer_hash'] == tokenizer.tokenizer_hash(tok) and meta['vocab_size'] == len(tok)
    assert meta['dtype'] == 'uint16' and train.dtype == np.uint16
    assert (len(train), len(val)) == (meta['train_tokens'], meta['val_tokens'])
    eos = meta['eos_id']
    assert eos == tok.eos_token_id
    # every play ends with eos, so each split ends with one and holds one per play
    assert train[-1] == eos and val[-1] == eos
    assert (val == eos).sum() == len(meta['val_plays']) == 3 and (train == eos).sum() == 35
    val_titles, train_titles = play_titles(val, tok, eos), play_titles(train, tok, eos)
    assert val_titles == ['# Julius Caesar', '# The Tempest', '# Macbeth']  # sorted by path
    assert not set(val_titles) & set(train_titles) and len(set(train_titles)) == 35
    # the text reads like a play: speaker lines turned into 'NAME:', markdown hard breaks gone
    head = tok.decode(val[:400].tolist())
    assert head.startswith('# Julius Caesar\n')
    assert re.search(r'^[A-Z][A-Za-z ]+:$', head, re.M) and '**' not in head and '  \n' not in head
    assert 0.04 < len(val) / (len(train) + len(val)) < 0.09


def test_hf_tokenizer_path_gives_the_same_files(tiny_teacher, tmp_path, monkeypatch):
    # a few plays keep this quick; the HF path is what a non-byte-level teacher gets
    plays = prepare.read_plays()
    subset = [p for p in plays if p[0] in prepare.VAL_PLAYS] + plays[:2]
    monkeypatch.setattr(prepare, 'read_plays', lambda: subset)
    a = prepare.prepare(tiny_teacher, tmp_path / 'a')
    b = prepare.prepare(tiny_teacher, tmp_path / 'b', tokenizer='hf')
    for split in ('train', 'val'):
        assert (a / f'{split}.bin').read_bytes() == (b / f'{split}.bin').read_bytes()
    meta_a, meta_b = (json.loads((d / 'meta.json').read_text()) for d in (a, b))
    assert (meta_a.pop('tokenizer'), meta_b.pop('tokenizer')) == ('tiktoken', 'hf') and meta_a == meta_b
    assert sorted(p.name for p in a.iterdir()) == ['meta.json', 'train.bin', 'val.bin']  # no temp files left


def test_dtype_holds_every_id():
    assert prepare.token_dtype(49151) == np.uint16
    assert prepare.token_dtype(65535) == np.uint16
    assert prepare.token_dtype(65536) == np.uint32
    assert prepare.token_dtype(151935) == np.uint32  # Qwen2.5's padded vocabulary
    ids = [0, 65535, 65536, 151935]
    assert prepare.to_array(ids, np.uint32).tolist() == ids
    with pytest.raises(ValueError, match='does not fit uint16'):
        prepare.to_array(ids, np.uint16)  # a silent cast would wrap 65536 to 0
    with pytest.raises(ValueError):
        prepare.to_array([-1], np.uint32)


def test_clean():
    md = "# Macbeth\n\n**First Witch**  \nWhen shall we three meet again  \nIn thunder?\n\n_Exeunt_\n"
    assert prepare.clean(md) == "# Macbeth\n\nFirst Witch:\nWhen shall we three meet again\nIn thunder?\n\n_Exeunt_\n"


def open_data(path, teacher, **kw):
    tok = AutoTokenizer.from_pretrained(teacher)
    return Data(path, tok, tokenizer.tiktoken_from_hf(tok, 'tiny'), batch_size=kw.pop('batch_size', 4),
                block_size=kw.pop('block_size', 64), device='cpu', **kw)


def test_stream_batches_are_windows_drawn_from_the_generator_alone(tiny_teacher, tiny_data):
    data = open_data(tiny_data, tiny_teacher)
    b = data.batch('train', torch.Generator().manual_seed(3))
    ids, _ = read_split(Path(tiny_data), 'train')
    assert b.x.shape == (4, 64) and b.x.dtype == torch.long and b.attention_mask is None and b.cached is None
    starts = torch.randint(len(ids) - 64, (4,), generator=torch.Generator().manual_seed(3)).tolist()
    assert all(b.x[i].tolist() == ids[s:s + 64].tolist() for i, s in enumerate(starts))
    # load=False (another rank's micro-step) draws the same numbers and loads nothing: the next batch is the same
    a, c = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert data.batch('train', a, load=False) is None
    data.batch('train', c)
    assert torch.equal(data.batch('train', a).x, data.batch('train', c).x)
    assert data.decode(data.encode('To be, or not')) == 'To be, or not' and data.eos_id == data.meta['eos_id']


def test_example_batches_pad_and_mask_and_grow_with_the_curriculum(tiny_teacher, tiny_examples):
    data = open_data(tiny_examples, tiny_teacher, batch_size=8, curriculum=0.5, schedule_iters=10)
    b = data.batch('val', torch.Generator().manual_seed(0))
    assert b.attention_mask.shape == b.x.shape == b.loss_mask.shape and b.x.shape[1] <= 64
    assert (b.loss_mask <= b.attention_mask).all() and (b.x[b.attention_mask == 0] == data.meta['eos_id']).all()
    n = len(data.by_length['train'][0])
    assert [data.curriculum_pool(it) for it in (0, 5, 10)] == [math.ceil(n * 0.1), n, n]


def test_data_that_cannot_serve_the_run_is_one_line(tiny_teacher, tiny_data, tiny_examples, tmp_path):
    other = tmp_path / 'other'
    shutil.copytree(tiny_data, other)
    meta = json.loads((other / 'meta.json').read_text())
    (other / 'meta.json').write_text(json.dumps({**meta, 'tokenizer_hash': '0123456789abcdef'}))
    for path, kw, words in [(other, {}, 'were made for tokenizer 0123456789abcdef'),
                            (tiny_data, {'block_size': 10 ** 7}, 'fewer than one block'),
                            (tiny_data, {'curriculum': 0.5}, '--curriculum orders examples by length'),
                            (tiny_examples, {'own_vocab': 512}, 'trains on streams of text'),
                            (tiny_examples, {'dtype': 'bfloat16'}, "answers generated in float32")]:
        with pytest.raises(SystemExit) as e:
            open_data(path, tiny_teacher, **kw)
        assert words in str(e.value) and '\n' not in str(e.value), (words, e.value)
