"""
vocab.py and prepare.py --student_vocab: a student BPE of its own, aligned with the teacher's tokens by byte
offset, and the projector from the teacher's hidden states to the student's vocabulary.

  python -m pytest tests/test_vocab.py -q
"""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

import teacher
import vocab
from conftest import TEXT, build_tokenizer, load_prepare

prepare = load_prepare()

# runs of spaces, tabs, blank lines, CRLF, 2/3/4-byte characters, combining accents, whitespace at both ends
DOCS = [
    "  Café au lait,\tstraße\t\tund Grüße.\n\n\nA blank line above;\r\nthen CRLF\r\n",
    "日本語のテキスト 🎭🎭 masks, e\u0301te\u0301 (combining) and naïve coöperation   ",
    "\n\t  First Citizen:\n    Before we proceed any further, hear me speak.  \r\n\r\n",
    "🎭",
    " ",
]
# each tokenizer merges inside multi-byte characters that the other splits into single bytes (the teacher ß
# and 語, the student é, 日本 and 🎭); neither has seen ö or テ, so both split those byte by byte
TEACHER_TEXT = TEXT + "straße, Grüße, ßß, 語 語 語\n"
STUDENT_TEXT = [TEXT, "Café, café, é, 日本, 日本, 🎭 🎭 🎭, \t\t\n\n\r\n"] * 4
SENTINEL = b'\xff'  # a special token's one byte (vocab.token_lengths counts it 1): no UTF-8 text contains 0xff
BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}  # transformers' own GPT-2 table, the reference


def reference_bytes(tokenizer):
    """{id: the bytes the token stands for}, from GPT-2's byte table; special tokens are SENTINEL."""
    tk = getattr(tokenizer, 'backend_tokenizer', tokenizer)
    specials = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
    return {i: SENTINEL if i in specials else bytes(BYTE_OF[c] for c in t) for t, i in tk.get_vocab().items()}


def prefixes(ids, table):
    """The bytes of ids[:i + 1] for every i, by concatenating each token's bytes."""
    out, acc = [], b''
    for i in ids:
        acc += table[int(i)]
        out.append(acc)
    return out


@pytest.fixture(scope='module')
def pair():
    """(teacher-like HF tokenizer, student tokenizers.Tokenizer) of different vocabularies."""
    return build_tokenizer(TEACHER_TEXT), vocab.train_bpe(STUDENT_TEXT, 400)


def streams(t_tok, s_tok, docs):
    """Both tokenizations of docs, each document followed by its tokenizer's eos."""
    t_eos, s_eos = t_tok.eos_token_id, s_tok.token_to_id(vocab.EOS)
    t_ids = [i for d in docs for i in t_tok(d, add_special_tokens=False).input_ids + [t_eos]]
    s_ids = [i for d in docs for i in s_tok.encode(d).ids + [s_eos]]
    return np.array(t_ids), np.array(s_ids)


def test_train_bpe_keeps_every_byte_and_is_deterministic(pair, tmp_path):
    _, s_tok = pair
    assert set(BYTE_OF) <= set(s_tok.get_vocab()), "a single byte is missing from the student's vocabulary"
    assert s_tok.get_vocab_size() == 400 and s_tok.token_to_id(vocab.EOS) is not None
    for d in DOCS:
        assert s_tok.decode(s_tok.encode(d).ids) == d
    assert vocab.train_bpe(STUDENT_TEXT, 400).to_str() == s_tok.to_str()
    with pytest.raises(SystemExit, match='at least 257'):
        vocab.train_bpe(STUDENT_TEXT, 256)


def test_token_lengths_count_bytes(pair):
    for tok in pair:
        want = reference_bytes(tok)
        lengths = vocab.token_lengths(tok)
        assert len(lengths) == len(want)
        assert all(lengths[i] == len(b) for i, b in want.items())
    t_tok, s_tok = pair
    t_eos, s_eos = t_tok.eos_token_id, s_tok.token_to_id(vocab.EOS)
    assert vocab.token_lengths(t_tok)[t_eos] == vocab.token_lengths(s_tok)[s_eos] == 1


def test_align_on_tricky_text(pair):
    t_tok, s_tok = pair
    t_ids, s_ids = streams(t_tok, s_tok, DOCS)
    t_ends = vocab.ends(t_ids, vocab.token_lengths(t_tok))
    s_ends = vocab.ends(s_ids, vocab.token_lengths(s_tok))
    pos = vocab.align(t_ends, s_ends)
    t_pre, s_pre = prefixes(t_ids, reference_bytes(t_tok)), prefixes(s_ids, reference_bytes(s_tok))
    assert s_pre[-1] == t_pre[-1] == b''.join(d.encode('utf-8') + SENTINEL for d in DOCS)
    assert s_ends[-1] == t_ends[-1] == len(s_pre[-1])

    teacher_boundaries = set(t_pre)
    for i, j in enumerate(pos):
        if j >= 0:  # the same text up to here, byte for byte
            assert s_pre[i] == t_pre[j], (i, j)
        else:
            assert s_pre[i] not in teacher_boundaries, i
    assert (pos == -1).sum() > 5 and (pos >= 0).sum() > 20, "the two tokenizers should split this text differently"

    def mid_character(prefix):
        try:
            prefix.split(SENTINEL)[-1].decode('utf-8')
            return False
        except UnicodeDecodeError:
            return True
    # boundaries inside a character, aligned or not: why offsets are bytes, not characters
    assert any(mid_character(s_pre[i]) for i in np.flatnonzero(pos >= 0))
    assert any(mid_character(s_pre[i]) for i in np.flatnonzero(pos < 0))
    assert any(mid_character(p) for p in t_pre if p not in set(s_pre))


def test_window_starts_match_reference(pair):
    t_tok, s_tok = pair
    t_ids, s_ids = streams(t_tok, s_tok, DOCS * 3)
    t_ends = vocab.ends(t_ids, vocab.token_lengths(t_tok))
    s_ends = vocab.ends(s_ids, vocab.token_lengths(s_tok))
    block_size = 16
    teacher_starts = {0, *t_ends.tolist()}
    first_byte = [0, *s_ends[:-1].tolist()]
    want = [i for i in range(len(s_ids) - block_size + 1) if first_byte[i] in teacher_starts]
    got = vocab.window_starts(s_ends, t_ends, block_size)
    assert got.tolist() == want
    assert 0 < len(want) < len(s_ids) - block_size + 1
    assert len(vocab.window_starts(s_ends, t_ends, len(s_ids) + 1)) == 0


@pytest.fixture(scope='module')
def student_data(tiny_teacher, tmp_path_factory):
    """prepare(..., student_vocab=512) on the real plays; returns (out_dir, the texts the BPE was trained on)."""
    seen, train_bpe = [], vocab.train_bpe

    def spy(texts, vocab_size):
        seen.extend(texts)
        return train_bpe(texts, vocab_size)
    mp = pytest.MonkeyPatch()
    mp.setattr(prepare.vocab_lib, 'train_bpe', spy)
    try:
        out = prepare.prepare(tiny_teacher, tmp_path_factory.mktemp('student_data'), student_vocab=512)
    finally:
        mp.undo()
    return out, seen


def load_stream(data_dir, split):
    meta = json.loads((data_dir / 'meta.json').read_text())
    return np.fromfile(data_dir / f'{split}.bin', dtype=meta['dtype']), meta


def test_prepare_student_vocab(tiny_teacher, student_data):
    out, bpe_texts = student_data
    sdir = out / 'student-bpe512'
    t_tok, _ = teacher.load_tokenizer(tiny_teacher)
    s_tok = Tokenizer.from_file(str(sdir / 'tokenizer.json'))
    t_len, s_len = vocab.token_lengths(t_tok), vocab.token_lengths(s_tok)
    for split in ('train', 'val'):
        t_ids, t_meta = load_stream(out, split)
        s_ids, s_meta = load_stream(sdir, split)
        assert s_meta['dtype'] == 'uint16' and s_meta['vocab_size'] == s_tok.get_vocab_size() == 512
        assert s_meta['tokenizer_hash'] == teacher.tokenizer_hash(s_tok)
        assert s_meta['teacher_tokenizer_hash'] == t_meta['tokenizer_hash']
        assert len(s_ids) == s_meta[f'{split}_tokens'] < len(t_ids)  # 512 merges on Shakespeare beat 500 on TEXT
        n_docs = int((s_ids == s_meta['eos_id']).sum())
        assert n_docs == int((t_ids == t_meta['eos_id']).sum()) > 0
        total = s_meta[f'{split}_bytes'] + n_docs
        assert vocab.ends(t_ids, t_len)[-1] == vocab.ends(s_ids, s_len)[-1] == total
    # the val plays, byte for byte in both streams (train is the same code on more plays)
    t_bytes, s_bytes = reference_bytes(t_tok), reference_bytes(s_tok)
    assert b''.join(t_bytes[i] for i in t_ids.tolist()) == b''.join(s_bytes[i] for i in s_ids.tolist())

    plays = prepare.read_plays()
    val_texts = {text for name, text in plays if name in prepare.VAL_PLAYS}
    assert bpe_texts == [text for name, text in plays if name not in prepare.VAL_PLAYS]
    assert not val_texts & set(bpe_texts)


def test_prepare_rejects_a_tiny_student_vocab(tiny_teacher, tmp_path):
    with pytest.raises(SystemExit, match='at least 257'):
        prepare.prepare(tiny_teacher, tmp_path, student_vocab=100)
    assert not any(tmp_path.iterdir()), "it should fail before writing anything"


def test_prepare_refuses_streams_of_different_bytes(pair, tmp_path):
    t_tok, s_tok = pair
    plays = [('hamlet', DOCS[0]), ('macbeth', DOCS[1])]  # macbeth is a val play
    teacher_splits = {split: t_tok(text, add_special_tokens=False).input_ids + [t_tok.eos_token_id]
                      for split, (_, text) in zip(('train', 'val'), plays)}
    teacher_splits['train'].pop(-2)  # a teacher tokenizer that dropped a few bytes of the text
    with pytest.raises(AssertionError, match="train: the teacher's tokens cover"):
        prepare.prepare_student(s_tok, plays, teacher_splits, t_tok, {}, tmp_path)
    assert not any(tmp_path.iterdir())


def test_aligned_batch_on_the_plays(tiny_teacher, student_data):
    out, _ = student_data
    sdir = out / 'student-bpe512'
    t_tok, _ = teacher.load_tokenizer(tiny_teacher)
    s_tok = Tokenizer.from_file(str(sdir / 'tokenizer.json'))
    t_ids, t_meta = load_stream(out, 'val')
    s_ids, _ = load_stream(sdir, 'val')
    t_ends = vocab.ends(t_ids, vocab.token_lengths(t_tok))
    s_ends = vocab.ends(s_ids, vocab.token_lengths(s_tok))
    block_size, pad = 64, t_meta['eos_id']
    valid = vocab.window_starts(s_ends, t_ends, block_size)
    starts = np.random.default_rng(0).choice(valid, 8, replace=False)
    starts[0] = 0
    x, tx, tmask, pos = vocab.aligned_batch(s_ids, t_ids, s_ends, t_ends, starts, block_size, 2 * block_size, pad)
    assert x.shape == pos.shape == (8, block_size) and tx.shape == tmask.shape == (8, 2 * block_size)
    t_bytes, s_bytes = reference_bytes(t_tok), reference_bytes(s_tok)
    for b, s in enumerate(starts):
        assert x[b].tolist() == s_ids[s:s + block_size].tolist()
        n = int(tmask[b].sum())
        assert tmask[b, :n].all() and (tx[b, n:] == pad).all() and n < 2 * block_size
        s_pre, t_pre = prefixes(x[b].tolist(), s_bytes), prefixes(tx[b, :n].tolist(), t_bytes)
        assert s_pre[-1].startswith(t_pre[-1])  # the teacher sees the student's text from the same first byte
        for t, j in enumerate(pos[b].tolist()):
            if j >= 0:
                assert s_pre[t] == t_pre[j], (b, t, j)
            else:
                assert s_pre[t] not in set(t_pre), (b, t)
    assert (pos == -1).any() and (pos >= 0).float().mean() > 0.3

    # a shorter teacher window: the same tokens, cut; positions past it get no target
    x2, tx2, tmask2, pos2 = vocab.aligned_batch(s_ids, t_ids, s_ends, t_ends, starts, block_size, 16, pad)
    assert torch.equal(x2, x) and torch.equal(tx2, tx[:, :16]) and torch.equal(tmask2, tmask[:, :16])
    assert torch.equal(pos2, torch.where(pos < 16, pos, -1)) and (pos >= 16).any()

    inside = next(i for i in range(1, len(s_ids)) if i not in set(valid.tolist()))
    with pytest.raises(AssertionError, match='window_starts'):
        vocab.aligned_batch(s_ids, t_ids, s_ends, t_ends, [inside], block_size, 16, pad)


def test_projector_init():
    torch.manual_seed(0)
    proj = vocab.Projector(256, 128)
    w = proj.proj.weight
    assert w.shape == (128, 256) and abs(w.std().item() - 0.01) < 0.0005 and abs(w.mean().item()) < 0.0005
    assert (proj.proj.bias == 0).all()
    assert proj(torch.randn(2, 5, 256)).shape == (2, 5, 128)


def test_projector_learns_the_teachers_next_tokens():
    """Cross-entropy on the student's next tokens through the student's fixed head teaches the projector what
    the teacher's hidden states predict."""
    torch.manual_seed(0)
    t_width, s_width, V = 64, 32, 100
    h = torch.randn(512, t_width)  # fixed teacher hidden states
    head = torch.randn(V, s_width)  # the student's head, fixed (detached in training)
    y = (h @ torch.randn(t_width, s_width) @ head.t()).argmax(-1)  # next tokens that h determines
    proj = vocab.Projector(t_width, s_width)
    opt = torch.optim.Adam(proj.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = torch.nn.functional.cross_entropy(proj(h) @ head.t(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - np.log(V)) < 0.5  # small init: near-uniform logits at the start (seed 004)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
