"""
tokenizer.py: the tiktoken encoder that must give the teacher tokenizer's ids, refused where it cannot, and the
tokenizer's hash.

  python -m pytest tests/test_tokenizer.py -q
"""

import json

import pytest
import tiktoken
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import tokenizer
from teacher import load_tokenizer
from conftest import TEXT, build_tokenizer

# text the tokenizers were not trained on: unicode, digits, runs of spaces and newlines, apostrophes, emoji
VARIED = [
    "Hello, world! It's 2024; we'll see you're right -- don't we've they'd I'm.",
    "Numbers 0 1 22 333 4444 55555 3.14159 1,000,000 and x2y3 and 12ab34.",
    "Spaces:  two,   three,    four\tand\ttabs \n\n\nthree newlines\r\nand CRLF   \n  trailing   ",
    "Unicode: café naïve Ærø Straße Ελληνικά русский 日本語 한국어 العربية ½ ² Ⅻ",
    "Emoji: 🎉🎭👑 and ZWJ 👩‍👩‍👧 and flags 🇬🇧, also “curly quotes” — and ‘single’…",
    "Decomposed: cafe\u0301 and nai\u0308ve; fullwidth ＡＢＣ１２３",
    "   leading spaces, then a 1 digit after spaces:  1  22   333",
    "",
]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def hf_ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_tiktoken_equals_tiny_tokenizer(tiny_teacher):
    tok, enc = load_tokenizer(tiny_teacher)
    assert isinstance(enc, tiktoken.Encoding)
    tokenizer.check_same_ids(enc, tok, VARIED + [TEXT])
    for text in VARIED:  # the same, spelled out without check_same_ids
        assert tokenizer.encode(enc, tok, text) == hf_ids(tok, text)
        assert tok.decode(tokenizer.encode(enc, tok, text)) == text
    for special in ['<|endoftext|>', '<|im_start|>', '<|im_end|>']:
        assert enc.encode_single_token(special) == tok.convert_tokens_to_ids(special)
    chat = tok.apply_chat_template([{'role': 'user', 'content': "Who's there? 42"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tokenizer.encode(enc, tok, chat)
    assert ids == hf_ids(tok, chat)
    assert ids[0] == tok.convert_tokens_to_ids('<|im_start|>')
    assert ids.count(tok.convert_tokens_to_ids('<|im_end|>')) == 1


@pytest.mark.parametrize('kind', ['digits', 'qwen2-split', 'nfc'])
def test_tiktoken_equals_other_byte_level_tokenizers(kind):
    if kind == 'digits':
        tok = build_tokenizer(pre_tokenizer=pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]))
    elif kind == 'qwen2-split':
        tok = build_tokenizer(pre_tokenizer=pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior='isolated', invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    else:
        tok = build_tokenizer(normalizer=normalizers.NFC())
    enc = tokenizer.tiktoken_from_hf(tok, kind)
    assert enc is not None
    tokenizer.check_same_ids(enc, tok, VARIED + [TEXT])


def test_not_byte_level_bpe_gives_none(capsys):
    word_level = Tokenizer(models.WordLevel({'hello': 0, 'world': 1, '[UNK]': 2}, unk_token='[UNK]'))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe_whitespace = Tokenizer(models.BPE({'a': 0, 'b': 1, 'ab': 2}, [('a', 'b')]))
    bpe_whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    for tk in (word_level, bpe_whitespace):
        assert tokenizer.tiktoken_from_hf(PreTrainedTokenizerFast(tokenizer_object=tk), 'x') is None
    prefix = build_tokenizer(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=True))
    assert tokenizer.tiktoken_from_hf(prefix, 'x') is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all('no tiktoken encoder' in l for l in lines)
    assert 'WordLevel' in lines[0] and 'Whitespace' in lines[1] and 'add_prefix_space' in lines[2]


def test_ids_out_of_merge_order_give_none(tiny_teacher):
    # tiktoken would merge by id, HF by merge position: swapping two merged tokens' ids breaks equality
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab, merges = spec['model']['vocab'], spec['model']['merges']
    first, last = ''.join(merges[0]), ''.join(merges[-1])
    vocab[first], vocab[last] = vocab[last], vocab[first]
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    assert tokenizer.tiktoken_from_hf(tok, 'ok') is not None
    assert tokenizer.tiktoken_from_hf(swapped, 'swapped') is None


def test_token_its_merges_do_not_make_gives_none(capsys):
    # merges b+c, then a+b, then ab+c: HF BPE turns the piece 'abc' into a, bc (no merge joins those two),
    # while tiktoken returns a piece that is itself a token at once
    vocab = {'a': 0, 'b': 1, 'c': 2, 'bc': 3, 'ab': 4, 'abc': 5}
    tk = Tokenizer(models.BPE(vocab, [('b', 'c'), ('a', 'b'), ('ab', 'c')]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    assert tok.convert_ids_to_tokens(hf_ids(tok, 'abc')) == ['a', 'bc']
    assert tokenizer.tiktoken_from_hf(tok, 'x') is None
    assert "'abc' does not encode to itself" in capsys.readouterr().out


def test_absent_byte_is_refused_not_dropped():
    # trained without the full byte alphabet: the HF tokenizer silently drops 'Ω'; encode() must refuse it
    tok = build_tokenizer(all_bytes=False)
    enc = tokenizer.tiktoken_from_hf(tok, 'partial')
    assert enc is not None
    tokenizer.check_same_ids(enc, tok, [TEXT])
    with pytest.raises(SystemExit, match="'Ω'"):
        tokenizer.encode(enc, tok, "the ohm: Ω")


def test_check_same_ids_names_the_mismatch(tiny_teacher):
    tok, enc = load_tokenizer(tiny_teacher)
    wrong = tiktoken.Encoding('wrong', pat_str=r'\S+|\s+', mergeable_ranks=enc._mergeable_ranks,
                              special_tokens=enc._special_tokens)
    with pytest.raises(SystemExit) as e:
        tokenizer.check_same_ids(wrong, tok, ["hello", "hello world"])  # ' world' vs ' ', 'world'
    msg = str(e.value.code)
    assert f"text 1 at token {len(hf_ids(tok, 'hello'))}:" in msg and '--tokenizer=hf' in msg and '\n' not in msg


def test_tokenizer_hash(tiny_teacher):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    again = AutoTokenizer.from_pretrained(tiny_teacher)
    assert tokenizer.tokenizer_hash(tok) == tokenizer.tokenizer_hash(again)
    again.add_tokens(['<extra>'])
    assert tokenizer.tokenizer_hash(tok) != tokenizer.tokenizer_hash(again)
    assert tokenizer.tokenizer_hash(tok) != tokenizer.tokenizer_hash(build_tokenizer(vocab_size=400))
    # pinned: every prepared token directory records this hash, so it must never drift between runs/versions
    fixed = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({'a': 0, 'b': 1}, unk_token='a')))
    assert tokenizer.tokenizer_hash(fixed) == '4b4543fe55612726'
