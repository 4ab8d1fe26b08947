"""
A student with its own, smaller vocabulary: a byte-level BPE trained on the corpus, the alignment of its tokens
with the teacher's by byte offsets in the text, and the projector from the teacher's final hidden state to
logits over the student's vocabulary.

Both token streams cover the same text (prepare.py --student_vocab=N asserts it), so a student position and a
teacher position that end at the same byte offset have seen the same text; only there does the teacher give a
KD target.

  python -c "import vocab; tk = vocab.train_bpe(['To be, or not to be'] * 100, 300); print(tk.encode('to be').tokens)"

In training (s_ids, t_ids: the two streams of one split, from prepare.py's student-bpeN/ and its parent):
  s_ends = vocab.ends(s_ids, vocab.token_lengths(student_tok))
  t_ends = vocab.ends(t_ids, vocab.token_lengths(teacher_tok))
  starts = vocab.window_starts(s_ends, t_ends, block_size)  # once; draw each batch's starts from these
  x, tx, tmask, pos = vocab.aligned_batch(s_ids, t_ids, s_ends, t_ends, starts[ix], block_size, teacher_len, pad_id)
  h, has = vocab.aligned_teacher(teacher_model, batch, autocast)   # the teacher's states where positions align
  t, projector_ce = vocab.through_projector(projector, student_head.weight, h, has, x, ce_loss, autocast)
"""

import numpy as np
import torch
import torch.nn as nn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from losses import Teacher
from teacher import teacher_hidden
from tokenizer import _unicode_to_byte

EOS = '<|endoftext|>'


def train_bpe(texts, vocab_size, eos=EOS):
    """A byte-level BPE of vocab_size tokens trained on texts (a list of str), eos its one special token.
    GPT-2's pre-tokenizer regex, no prefix space, and all 256 single bytes, so no byte of any text is ever
    dropped. Deterministic for the same texts."""
    if vocab_size < 256 + 1:
        raise SystemExit(f"indra: a byte-level BPE of {vocab_size} tokens cannot hold the 256 single bytes and "
                         f"its eos token; use at least 257 (e.g. --student_vocab=8192)")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return tk


def token_lengths(tokenizer):
    """(max id + 1,) int64: how many bytes of text each token id stands for. A special token (the eos between
    documents) counts 1, so a document boundary is a position in both streams; an added token that is not
    special is text, its UTF-8 length. Takes a transformers fast tokenizer or a tokenizers.Tokenizer."""
    tk = getattr(tokenizer, 'backend_tokenizer', tokenizer)
    added = tk.get_added_tokens_decoder()
    to_byte = _unicode_to_byte()  # byte-level BPE writes each byte as one character
    vocab = tk.get_vocab(with_added_tokens=True)
    out = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for token, i in vocab.items():
        if i in added:
            out[i] = 1 if added[i].special else len(added[i].content.encode('utf-8'))
        elif all(c in to_byte for c in token):
            out[i] = len(token)
        else:
            raise SystemExit(f"indra: token {token!r} is not byte-level; aligning tokenizers by byte offsets needs "
                             f"byte-level BPE tokenizers (GPT-2, SmolLM, Qwen, Llama-3 style)")
    return out


def ends(ids, lengths):
    """(N,) int64: the byte offset where each token of the stream ids ends (the first starts at 0).
    Byte offsets, not character offsets: a byte-level token can end in the middle of a multi-byte character
    (say one byte of the three of '日'), where no character offset exists."""
    return np.cumsum(lengths[ids])


def align(teacher_ends, student_ends):
    """(N_student,) int64: for each student position, the index of the teacher token that ends at the same byte
    offset, or -1 where the teacher has no boundary there (its hidden state has seen a different amount of
    text, so that position gets no KD target). Both arrays strictly increase."""
    j = np.searchsorted(teacher_ends, student_ends)
    hit = j < len(teacher_ends)
    hit[hit] = teacher_ends[j[hit]] == student_ends[hit]
    return np.where(hit, j, -1)


def window_starts(student_ends, teacher_ends, block_size):
    """The student positions where a window of block_size tokens may start: the token's first byte is also
    where a teacher token starts (offset 0, or an aligned end), so the teacher sees exactly the student's text
    from the same first byte; and block_size tokens fit before the end of the stream."""
    boundary = np.concatenate([[True], align(teacher_ends, student_ends)[:-1] >= 0])
    return np.flatnonzero(boundary[:max(len(student_ends) - block_size + 1, 0)])


def aligned_batch(student_ids, teacher_ids, student_ends, teacher_ends, starts, block_size, teacher_len, pad_id):
    """One batch of windows of the two streams (numpy arrays over the whole stream; starts from window_starts):
      x      (B, block_size)   int64 student tokens, as train.py's get_batch (the loss shifts by one inside)
      tx     (B, teacher_len)  int64 teacher tokens of the same text from the same first byte, right-padded
                               with pad_id: those that end within the student's window, at most teacher_len
      tmask  (B, teacher_len)  int64 1 on real teacher tokens, 0 on padding
      pos    (B, block_size)   int64 teacher position (in tx) that has seen the same text as x[:, :t+1],
                               -1 where there is none or it fell past teacher_len
    CPU tensors; move them to the device with the rest of the batch."""
    B = len(starts)
    x = torch.empty(B, block_size, dtype=torch.long)
    tx = torch.full((B, teacher_len), pad_id, dtype=torch.long)
    tmask = torch.zeros(B, teacher_len, dtype=torch.long)
    pos = torch.empty(B, block_size, dtype=torch.long)
    for b, s in enumerate(starts):
        first = student_ends[s - 1] if s > 0 else 0  # byte offset where the window starts
        t0 = np.searchsorted(teacher_ends, first, side='right')  # the teacher token that starts there
        assert first == (teacher_ends[t0 - 1] if t0 > 0 else 0), \
            f"student position {s} starts at byte {first}, inside a teacher token; draw starts from window_starts"
        s_ends = student_ends[s:s + block_size]
        n = min(np.searchsorted(teacher_ends, s_ends[-1], side='right') - t0, teacher_len)
        x[b] = torch.from_numpy(student_ids[s:s + block_size].astype(np.int64))
        tx[b, :n] = torch.from_numpy(teacher_ids[t0:t0 + n].astype(np.int64))
        tmask[b, :n] = 1
        pos[b] = torch.from_numpy(align(teacher_ends[t0:t0 + n], s_ends))
    return x, tx, tmask, pos


class Projector(nn.Module):
    """The teacher's final hidden state (..., teacher_width) -> a vector in the student's embedding space
    (..., student_width); logits over the student's vocabulary are projector(h) @ student_head.weight.T (seed
    002's fast path: never teacher_probs @ embedding, which costs a (V_teacher x width) matmul per position).

    Trained by cross-entropy on the student's next tokens through the student's head detached, so it learns the
    teacher's prediction in the student's vocabulary and cannot collapse onto the student; the KD term uses its
    logits under a stop-gradient. Initialized small (seed 004: the default init gave a KL of 9.4 at step 0
    that drowned the run); seed 004 also gives it 5x the learning rate and warms the KD weight 0.1 -> 0.7."""

    def __init__(self, teacher_width, student_width):
        super().__init__()
        self.proj = nn.Linear(teacher_width, student_width)
        nn.init.normal_(self.proj.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h_teacher):
        return self.proj(h_teacher)


def aligned_teacher(teacher_model, batch, autocast):
    """The teacher's final hidden state on its tokens of the batch's text, taken at the positions aligned with the
    student's (B, T, Ct), and where there is one (B, T) bool (data.Batch: teacher_x, teacher_mask, aligned)."""
    with torch.no_grad(), autocast:
        h = teacher_hidden(teacher_model, batch.teacher_x, batch.teacher_mask).to(batch.x.device)  # (B, Lt, Ct)
    pos = batch.aligned
    return h.gather(1, pos.clamp(min=0)[..., None].expand(-1, -1, h.size(-1))), pos >= 0


def through_projector(projector, head, h, has, x, ce_loss, autocast):
    """The projector's view of the aligned teacher states h: a Teacher for the KD term (its logits over the
    student's vocabulary through the student's head, all under a stop-gradient) and the projector's own loss,
    CE (ce_loss, a DistillationLoss with kd_weight 0) on the student's next tokens x where the teacher has a state
    (this trains it; a projector trained by the KD term would just learn to agree with the student)."""
    head = head.detach()
    with autocast:
        p = projector(h)  # (B, T, C)
        targets = torch.cat([torch.zeros_like(has[:, :1]), has[:, :-1]], dim=1)  # loss masks mark the token predicted
        p_ce = ce_loss(p, head, x, None, targets)[0]
    return Teacher(hidden=p.detach(), head=head, mask=has), p_ce
