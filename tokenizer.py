"""
The teacher's tokenizer, fast and proven: a tiktoken.Encoding built from a byte-level BPE Hugging
Face tokenizer (bytes -> ranks from its merges, one regex equal to its pre-tokenizer), refused
(None) wherever one regex and the merge ranks could not reproduce it, and checked on the corpus
itself (check_same_ids) before data prep trusts it. Also the pieces every script shares: encode
text, a chat prompt in the teacher's template, the tokenizer's hash, the bytes each token stands for.

    enc = tiktoken_from_hf(tok, 'smollm2')           # or None: use the HF tokenizer
    ids = encode(enc, tok, "To be, or not to be")    # the HF tokenizer's ids, ~5-10x faster
    text = chat_prompt(tok, "What is 2 + 3?")        # one user turn, ending where the answer begins

teacher.load_tokenizer(spec) returns the HF tokenizer and this encoder together.
"""
import functools
import hashlib
import json
import time
import unicodedata

import tiktoken
import tokenizers
import torch

# the pre-tokenizer regex of ByteLevel(use_regex=True) in HF tokenizers, which is GPT-2's
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits=True) then ByteLevel(use_regex=True), folded into one regex: every
# digit is its own piece, and a digit ends a piece, so the whitespace lookahead stops before one
GPT2_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


def _unicode_to_byte():
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE writes each byte as one printable character.
    Printable latin-1 bytes stand for themselves; the other 68 bytes map to chr(256), chr(257), ... in order."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    char_of = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in char_of]
    char_of.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return {c: b for b, c in char_of.items()}


def token_bytes(tokenizer, vocab_size):
    """(vocab_size,) int64: the bytes of text each token id stands for; 0 for added/special tokens and for logits
    past the tokenizer. Exact for byte-level BPE (one character per byte); otherwise the UTF-8 length of the
    token's text. Bits per byte = summed CE / (ln 2 x summed bytes) compares models across tokenizers."""
    to_byte = _unicode_to_byte()
    added = set(tokenizer.added_tokens_decoder)
    out = torch.zeros(vocab_size, dtype=torch.long)
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size and i not in added:
            out[i] = len(token) if all(c in to_byte for c in token) else len(
                tokenizer.convert_tokens_to_string([token]).encode('utf-8'))
    return out


def _pretokenizer_pattern(pre):
    """The one regex equal to a byte-level pre-tokenizer, or (None, why not)."""
    steps = pre['pretokenizers'] if pre and pre['type'] == 'Sequence' else [pre]
    kinds = [s['type'] if s else None for s in steps]
    last = steps[-1] or {}
    if kinds[-1] != 'ByteLevel':
        return None, f"pre-tokenizer {kinds} is not byte-level"
    if last.get('add_prefix_space'):
        return None, "ByteLevel(add_prefix_space=True) adds a space tiktoken does not"
    if kinds == ['ByteLevel'] and last.get('use_regex', True):
        return GPT2_PATTERN, None
    if (kinds == ['Digits', 'ByteLevel'] and steps[0].get('individual_digits')
            and last.get('use_regex', True)):
        return GPT2_DIGITS_PATTERN, None
    # Qwen2 / Llama-3 style: the split regex does all the work, ByteLevel only maps bytes
    split = steps[0] if len(steps) == 2 else {}
    if (kinds == ['Split', 'ByteLevel'] and not last.get('use_regex', True) and 'Regex' in split['pattern']
            and split['behavior'] == 'Isolated' and not split.get('invert')):
        return split['pattern']['Regex'], None
    return None, f"pre-tokenizer sequence {kinds} has no single-regex equivalent here"


def tiktoken_from_hf(tokenizer, name):
    """A tiktoken.Encoding giving the same ids as a byte-level BPE HF tokenizer, or None (announced in one line).

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank, and the rank is
    also the output id; HF BPE merges the pair that comes first in its merge list. The two agree when ids
    grow with merge order, which is checked here; check_same_ids proves the equality on real text."""
    def fallback(why):
        print(f"indra: no tiktoken encoder for {name} ({why}); tokenizing with the teacher's own HF tokenizer")
        return None
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    if backend is None:
        return fallback("it is not a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec['model']
    if model['type'] != 'BPE':
        return fallback(f"model is {model['type']}, not BPE")
    if model.get('dropout') or model.get('byte_fallback') or model.get('continuing_subword_prefix') \
            or model.get('end_of_word_suffix'):
        return fallback("BPE with dropout, byte fallback or subword affixes")
    # NFC is applied to the text in encode() before tiktoken sees it; other normalizers change text in ways
    # one regex cannot follow
    normalizer = spec.get('normalizer')
    if normalizer is not None and normalizer['type'] != 'NFC':
        return fallback(f"normalizer {normalizer['type']}")
    pattern, why = _pretokenizer_pattern(spec.get('pre_tokenizer'))
    if pattern is None:
        return fallback(why)
    if (spec.get('decoder') or {}).get('type') != 'ByteLevel':
        return fallback("decoder is not ByteLevel")

    to_byte = _unicode_to_byte()
    vocab = model['vocab']
    added = {t['content']: t['id'] for t in spec['added_tokens']}
    if any(c not in to_byte for t in vocab for c in t if t not in added):
        return fallback("vocabulary has tokens that are not byte-level")
    # single bytes: a vocabulary may lack some (SmolLM2 lacks 21, e.g. 0x04 and 0xf5-0xff); HF silently
    # drops such bytes, tiktoken cannot, so encode() refuses text that contains one
    ranks = {bytes([b]): vocab[c] for c, b in to_byte.items() if c in vocab and c not in added}
    last_id = -1
    merged = []
    for i, m in enumerate(model['merges']):
        a, b = m.split(' ') if isinstance(m, str) else m
        token_id = vocab.get(a + b)
        if token_id is None or token_id <= last_id:
            return fallback(f"ids do not grow with merge order (merge {i}: {a!r} + {b!r})")
        last_id = token_id
        ranks[bytes(to_byte[c] for c in a + b)] = token_id
        merged.append(a + b)
    # tiktoken returns a piece that is itself a token at once. HF BPE does the same with ignore_merges (then
    # every token must be reachable by tiktoken too); otherwise it runs the merges, so every merged token
    # must come out of its own merges as itself
    if model.get('ignore_merges'):
        made = set(merged) | {c for c in vocab if len(c) == 1}
        unmade = [t for t in vocab if t not in made and t not in added]
        if unmade:
            return fallback(f"ignore_merges with {len(unmade)} tokens that no merge makes, e.g. {unmade[0]!r}")
    else:
        bpe = backend.model
        stray = next((t for t in merged if [x.value for x in bpe.tokenize(t)] != [t]), None)
        if stray is not None:
            return fallback(f"token {stray!r} does not encode to itself")
    try:
        return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)
    except ValueError as e:  # the regex is Oniguruma syntax that fancy-regex (tiktoken) rejects
        return fallback(f"tiktoken cannot compile the pre-tokenizer regex: {e}")


@functools.cache
def _absent_bytes(enc):
    absent = set()
    for b in range(256):
        try:
            enc.encode_single_token(bytes([b]))
        except KeyError:
            absent.add(b)
    return frozenset(absent)


def _uses_nfc(tokenizer):
    return isinstance(tokenizer.backend_tokenizer.normalizer, tokenizers.normalizers.NFC)


def encode(enc, tokenizer, text):
    """Token ids of text with no special tokens added; added tokens written in the text (e.g. '<|im_end|>')
    become their ids, as the HF tokenizer does. tiktoken when enc is given, else the HF tokenizer."""
    if enc is None:
        return tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    if _uses_nfc(tokenizer):
        text = unicodedata.normalize('NFC', text)
    absent = _absent_bytes(enc)
    if absent:
        bad = absent.intersection(text.encode('utf-8'))
        if bad:
            char = next(c for c in text if bad.intersection(c.encode('utf-8')))
            raise SystemExit(f"indra: the text contains {char!r} whose UTF-8 bytes are not in the teacher's "
                             f"vocabulary (its tokenizer would silently drop it); remove that character from the text")
    return enc.encode(text, allowed_special='all')


def chat_prompt(tokenizer, prompt):
    """One user turn in the teacher's chat template, ending where the assistant's answer begins. Data prep,
    training's collapse watch, eval.py and sample.py all format prompts here, so they match token for token."""
    return tokenizer.apply_chat_template([{'role': 'user', 'content': prompt}], tokenize=False,
                                         add_generation_prompt=True)


def chat_batch(enc, tokenizer, prompts, pad_id, device='cpu'):
    """Chat prompts as one generation batch: ids (B, L) left-padded with pad_id and attention mask (B, L), so
    every prompt ends at the last column and the answers start together."""
    ids = [encode(enc, tokenizer, chat_prompt(tokenizer, p)) for p in prompts]
    L = max(map(len, ids))
    x = torch.tensor([[pad_id] * (L - len(r)) + r for r in ids], device=device)
    am = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in ids], device=device)
    return x, am


def check_same_ids(enc, tokenizer, texts):
    """Prove encode() with enc equals the HF tokenizer on every text; return (tiktoken, hf) tokens per second.
    Both are timed one text at a time on one thread, the way prepare.py runs them."""
    assert enc is not None, "check_same_ids needs a tiktoken encoder; with enc=None there is nothing to check"
    t0 = time.perf_counter()
    ours = [encode(enc, tokenizer, t) for t in texts]
    t1 = time.perf_counter()
    theirs = [tokenizer(t, add_special_tokens=False, verbose=False).input_ids for t in texts]
    t2 = time.perf_counter()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            pos = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            lo, hi = max(0, pos - 3), pos + 4
            raise SystemExit(f"indra: tiktoken and the teacher tokenizer disagree on text {i} at token {pos}: "
                             f"tiktoken {a[lo:hi]} {tokenizer.convert_ids_to_tokens(a[lo:hi])} vs hf {b[lo:hi]} "
                             f"{tokenizer.convert_ids_to_tokens(b[lo:hi])}; prepare with --tokenizer=hf instead")
    n = sum(len(a) for a in ours)
    return n / max(t1 - t0, 1e-9), n / max(t2 - t1, 1e-9)


def tokenizer_hash(tokenizer):
    """First 16 hex digits of the sha256 of the full vocabulary (added tokens included), sorted by id."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode('utf-8')).hexdigest()[:16]
