"""
The training data: token files made on first use by data/<dataset>/prepare.py, checked against the
teacher that reads them, and drawn as batches. Three kinds of data, one Batch:

  a text stream (data/shakespeare)     windows of block_size tokens, every token real
  example data (data/agent)            one example per row, right-padded, a loss mask on the answer
  a student with its own tokenizer     windows of its own tokens, with the teacher's tokens of the same text
                                       and where the two align (vocab.py)

and, for a text stream, the teacher's top-k targets read from the cache that teacher.py --cache builds
(data.open_cache(path)).

    data = Data(data_path, tokenizer, enc, batch_size=8, block_size=256, device='cpu')
    batch = data.batch('train', generator)       # Batch(x, attention_mask, loss_mask, ...)
    ids = data.encode('ROMEO:')                  # the student's tokens of a text, and back: data.decode(ids)

Every batch is drawn from `generator` alone, so a run draws the same batches in every process: under
torchrun each rank draws the whole global batch order and loads only its share (load=False draws and
returns None).
"""
import importlib.util
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import vocab
from losses import Teacher
from tokenizer import encode, tokenizer_hash

ROOT = Path(__file__).resolve().parent


def fail(msg):
    raise SystemExit(f"indra: {msg}")


def prepare_on_first_use(dataset, data_path, teacher, own_vocab=0, dtype='float32'):
    """Run data/<dataset>/prepare.py into data_path unless its token files (and a student's own, own_vocab > 0)
    are there. A prepare() that takes a dtype (the agent data: the teacher answers) gets the run's."""
    student_path = data_path / f'student-bpe{own_vocab}' if own_vocab else None
    if all((p / 'meta.json').exists() for p in (data_path, student_path) if p):
        return
    prepare_py = ROOT / 'data' / dataset / 'prepare.py'
    if not prepare_py.exists():
        fail(f"no token files in {data_path} and no {prepare_py.relative_to(ROOT)} to make them; check --dataset")
    print(f"preparing {dataset} for {teacher} into {data_path}")
    spec = importlib.util.spec_from_file_location(f'prepare_{dataset}', prepare_py)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    takes = inspect.signature(prepare.prepare).parameters
    if own_vocab and 'student_vocab' not in takes:
        fail(f"{prepare_py.relative_to(ROOT)} cannot make a student tokenizer; use --student_tokenizer='' "
             f"or --dataset=shakespeare")
    prepare.prepare(teacher, data_path, **({'student_vocab': own_vocab} if own_vocab else {}),
                    **({'dtype': dtype} if 'dtype' in takes else {}))  # recorded teacher answers: in this run's dtype


def pad_examples(data, mask, spans, max_len, pad_id):
    """A batch of examples (token arrays data and mask, (start, length) per example in spans), right-padded with
    pad_id to the longest (at most max_len): ids (B, L), attention mask (B, L) 1 on real tokens, loss mask (B, L)
    1 where mask marks a token to learn (the answer). counted_tokens() then counts answer targets only."""
    L = min(max_len, max(n for _, n in spans))
    x = torch.full((len(spans), L), pad_id, dtype=torch.long)
    am, lm = torch.zeros_like(x), torch.zeros_like(x)
    for b, (start, n) in enumerate(spans):
        n = min(n, L)
        x[b, :n] = torch.from_numpy(data[start:start + n].astype('int64'))
        am[b, :n] = 1
        lm[b, :n] = torch.from_numpy(mask[start:start + n].astype('int64'))
    return x, am, lm


@dataclass
class Batch:
    """One micro-batch. The loss shifts by one inside: position t predicts token t+1."""
    x: torch.Tensor  # (B, T) the student's token ids
    attention_mask: torch.Tensor = None  # (B, T) 1 real, 0 padding; None: every token is real
    loss_mask: torch.Tensor = None  # (B, T) 1 on the tokens to learn (an example's answer); None: all of them
    cached: Teacher = None  # the teacher's targets from the cache, (B, T, k) each; None: the teacher runs live
    teacher_x: torch.Tensor = None  # own tokenizer: the teacher's tokens of the same text (B, Lt) ...
    teacher_mask: torch.Tensor = None  # ... their attention mask (B, Lt) ...
    aligned: torch.Tensor = None  # ... and per student position the teacher position that ends with it, -1: none
    sampled: bool = False  # the answers are the student's own (onpolicy.py): the loss is the divergence alone


class Data:
    """The token files in data_path for one teacher (its tokenizer and tiktoken encoder), checked on opening:
    every way they cannot serve this run is one line naming the fix. own_vocab > 0: the student reads its own
    BPE's token files in data_path/student-bpe<own_vocab>/. cached: whether the run trains on the teacher-targets
    cache, which open_cache() then attaches (it is built after these checks pass)."""

    def __init__(self, data_path, tokenizer, enc, batch_size, block_size, device, dtype='float32', own_vocab=0,
                 cached=False, curriculum=0.0, schedule_iters=1, teacher='', dataset='shakespeare'):
        self.path, self.tokenizer, self.enc = Path(data_path), tokenizer, enc
        self.batch_size, self.block_size, self.device = batch_size, block_size, device
        self.curriculum, self.schedule_iters = curriculum, schedule_iters
        meta = self.meta = json.loads((self.path / 'meta.json').read_text())
        if meta['tokenizer_hash'] != tokenizer_hash(tokenizer):
            fail(f"token files in {self.path} were made for tokenizer {meta['tokenizer_hash']} ({meta['teacher']}), "
                 f"not this teacher's ({tokenizer_hash(tokenizer)}); run python data/{dataset}/prepare.py "
                 f"--teacher={teacher} --out_dir=<new dir> and pass --data_dir=<new dir>")
        self.examples = meta.get('format') == 'examples'  # one example per row, padded, the loss on the answer
        made_in = meta.get('teacher_dtype', 'bfloat16' if self.examples else None)  # older agent data: bf16
        if made_in and made_in != dtype:
            fail(f"{self.path} holds the teacher's answers generated in {made_in}, and this run computes in {dtype}: "
                 f"pass --dtype={made_in}, or make the data again in {dtype} with its prepare.py (--dtype={dtype} "
                 f"--out_dir=<new dir>) and pass --data_dir=<new dir>")
        for split in ('train', 'val'):
            n = np.memmap(self.path / f'{split}.bin', dtype=meta['dtype'], mode='r').shape[0]
            if n <= block_size and not self.examples:
                fail(f"{split}.bin in {self.path} has {n} tokens, fewer than one block of {block_size + 1}; "
                     f"lower --block_size")
        if curriculum and not self.examples:
            fail(f"--curriculum orders examples by length, and {self.path} is one stream of text; use example data "
                 f"(meta.json format 'examples') or --curriculum=0")
        if self.examples and cached:
            fail("the teacher-targets cache covers streams of text, not padded examples; use --teacher_targets=live")
        if self.examples and own_vocab:
            fail("a student with its own tokenizer trains on streams of text, not on example data; "
                 "use --student_tokenizer=''")
        self.student_tok, self.aligned = None, {}
        if own_vocab:
            self._open_own_vocab(self.path / f'student-bpe{own_vocab}')
        self.by_length = {}  # example data: (spans (N, 2) start and length, example numbers shortest first)
        for split in ('train', 'val') if self.examples else ():
            for name in (f'{split}.idx', f'{split}.mask.bin'):
                if not (self.path / name).is_file():
                    fail(f"{self.path} holds example data (meta.json format 'examples') but no {name}; prepare it again")
            spans = np.fromfile(self.path / f'{split}.idx', dtype=np.int64).reshape(-1, 2)
            if len(spans) == 0:
                fail(f"{self.path / (split + '.idx')} lists no examples; prepare the data again")
            self.by_length[split] = (spans, np.argsort(spans[:, 1], kind='stable'))
        self.cache = None

    def open_cache(self, path):
        """Train on the teacher-targets cache in path (teacher.py's build_targets): its meta, and where it is."""
        self.cache = {**json.loads((Path(path) / 'meta.json').read_text()), 'path': Path(path)}

    def _open_own_vocab(self, student_path):
        """The student's tokenizer and token files, and per split both streams with their alignment (vocab.py)."""
        from tokenizers import Tokenizer
        self.student_tok = Tokenizer.from_file(str(student_path / 'tokenizer.json'))
        self.student_meta = json.loads((student_path / 'meta.json').read_text())
        if self.student_meta['teacher_tokenizer_hash'] != self.meta['tokenizer_hash']:
            fail(f"{student_path} was made beside other teacher token files; delete it to prepare it again")
        s_len, t_len = vocab.token_lengths(self.student_tok), vocab.token_lengths(self.tokenizer)
        for split in ('train', 'val'):
            s_ids = np.fromfile(student_path / f'{split}.bin', dtype=self.student_meta['dtype'])
            t_ids = np.fromfile(self.path / f'{split}.bin', dtype=self.meta['dtype'])
            s_ends, t_ends = vocab.ends(s_ids, s_len), vocab.ends(t_ids, t_len)
            self.aligned[split] = (s_ids, t_ids, s_ends, t_ends, vocab.window_starts(s_ends, t_ends, self.block_size))
            if not len(self.aligned[split][-1]):
                fail(f"{split}: no window of {self.block_size} student tokens in {student_path}; lower --block_size")
        share = (vocab.align(self.aligned['train'][3], self.aligned['train'][2]) >= 0).mean()
        print(f"student tokenizer: byte-level BPE of {self.student_meta['vocab_size']:,} tokens ({student_path}); "
              f"{share:.1%} of its training positions end where a teacher token ends and get a KD target")

    # ---- the student's tokens ----
    @property
    def vocab_size(self):
        """The student's vocabulary: its own BPE's, else None (the teacher's logit width)."""
        return self.student_meta['vocab_size'] if self.student_tok else None

    @property
    def longest_answer(self):
        """Example data: the most answer tokens (loss-mask tokens) any training example has."""
        spans = self.by_length['train'][0]
        counts = np.concatenate([[0], np.cumsum(np.fromfile(self.path / 'train.mask.bin', dtype=np.uint8))])
        return int((counts[spans[:, 0] + spans[:, 1]] - counts[spans[:, 0]]).max())

    @property
    def eos_id(self):
        """The student's end of text (or of an assistant turn, on chat data)."""
        return self.student_meta['eos_id'] if self.student_tok else self.meta['eos_id']

    def encode(self, text):
        return self.student_tok.encode(text).ids if self.student_tok else encode(self.enc, self.tokenizer, text)

    def decode(self, ids):
        return (self.student_tok or self.tokenizer).decode(ids)

    # ---- batches ----
    def curriculum_pool(self, it):
        """How many of the shortest training examples step `it` draws from. Seeds 001/002: short examples first;
        for the first `curriculum` share of training the pool grows linearly from the shortest 10% to all."""
        n = len(self.by_length['train'][0])
        progress = it / (self.curriculum * self.schedule_iters) if self.curriculum else 1.0
        return n if progress >= 1 else max(1, math.ceil(n * (0.1 + 0.9 * progress)))

    def batch(self, split, generator, it=0, load=True):
        """batch_size rows drawn from generator, as a Batch on the device; load=False only draws (another rank's
        micro-step) and returns None."""
        if self.examples:
            return self._examples(split, generator, it, load)
        if self.student_tok:
            return self._own_vocab(split, generator, load)
        data = np.memmap(self.path / f'{split}.bin', dtype=self.meta['dtype'], mode='r')  # re-opened: memmap leaks
        T, cache = self.block_size, self.cache if split == 'train' else None
        if cache is not None:  # the cache holds whole aligned blocks
            ix = torch.randint(cache['blocks'], (self.batch_size,), generator=generator) * T
        else:
            ix = torch.randint(len(data) - T, (self.batch_size,), generator=generator)
        if not load:
            return None
        rows = lambda a, dt: torch.stack([torch.from_numpy(a[i:i + T].astype(dt)) for i in ix.tolist()]).to(self.device)
        x = rows(data, np.int64)
        if cache is None:
            return Batch(x)
        shape = (cache['blocks'] * T, cache['top_k'])
        ids = np.memmap(cache['path'] / 'ids.bin', dtype=cache['ids_dtype'], mode='r', shape=shape)
        logp = np.memmap(cache['path'] / 'logp.bin', dtype=np.float16, mode='r', shape=shape)
        return Batch(x, cached=Teacher(ids=rows(ids, np.int64), logp=rows(logp, np.float32)))  # (B, T, k) each

    def _examples(self, split, generator, it, load):
        """Examples right-padded with eos to the longest (at most block_size), the loss mask on the answer."""
        spans, order = self.by_length[split]
        pool = self.curriculum_pool(it) if split == 'train' else len(order)
        picks = order[torch.randint(pool, (self.batch_size,), generator=generator).numpy()]
        if not load:
            return None
        data = np.memmap(self.path / f'{split}.bin', dtype=self.meta['dtype'], mode='r')
        mask = np.memmap(self.path / f'{split}.mask.bin', dtype=np.uint8, mode='r')
        x, am, lm = pad_examples(data, mask, spans[picks].tolist(), self.block_size, self.meta['eos_id'])
        return Batch(x.to(self.device), am.to(self.device), lm.to(self.device))

    def _own_vocab(self, split, generator, load):
        """Windows of the student's tokens and the teacher's tokens of the same text, aligned (vocab.py)."""
        s_ids, t_ids, s_ends, t_ends, starts = self.aligned[split]
        ix = torch.randint(len(starts), (self.batch_size,), generator=generator)
        if not load:
            return None
        # the teacher needs about as many tokens as the student for the same text; a few more leave room
        T = self.block_size
        x, tx, tmask, pos = vocab.aligned_batch(s_ids, t_ids, s_ends, t_ends, starts[ix.numpy()], T, T + T // 4,
                                                self.meta['eos_id'])
        to = lambda t: t.to(self.device)
        return Batch(to(x), teacher_x=to(tx), teacher_mask=to(tmask), aligned=to(pos))
