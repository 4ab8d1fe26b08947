"""
Shared fixtures: a tiny random Hugging Face teacher (byte-level BPE tokenizer + 2-layer Llama) saved to a
temporary directory, and the Shakespeare token files prepared for it.

  python -m pytest tests -q              # everything
  python -m pytest tests -q -m "not slow"
"""

import importlib.util
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# training text for the tiny tokenizers: verse, prose, numbers, punctuation, contractions, runs of spaces
TEXT = """\
First Citizen:
Before we proceed any further, hear me speak.
All: Speak, speak. You are all resolved rather to die than to famish?
Who's there? 'Tis I, my lord -- the watch; I'll not be gone, we'd stay, they're here, you've seen it.
Now is the winter of our discontent made glorious summer by this sun of York;
And all the clouds that lour'd upon our house in the deep bosom of the ocean buried.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
In 1599 the Globe opened; tickets cost 1 penny, 2 pence or 3 pence (about 0.25 of a shilling).
Act 3, Scene 2, lines 73-107: "Friends, Romans, countrymen, lend me your ears!"
    Indented verse keeps its spaces,    and so do    gaps.
Numbers: 42, 3.14159, 2,718, 1000000 and 007; percent: 50% off; email: will@globe.example.
"""


def build_tokenizer(text=TEXT, vocab_size=500, pre_tokenizer=None, normalizer=None, all_bytes=True):
    """A byte-level BPE trained on text, wrapped as a transformers fast tokenizer with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if normalizer is not None:
        tk.normalizer = normalizer
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if all_bytes else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    tk.train_from_iterator([text] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token='<|endoftext|>', pad_token='<|endoftext|>',
                                   chat_template=CHATML, model_max_length=1 << 30)


@pytest.fixture(scope='session')
def tiny_teacher(tmp_path_factory):
    """Path (str) of a directory with a tiny random LlamaForCausalLM and its tokenizer; the logits are wider
    than the tokenizer (vocab padded up to a multiple of 64), as Qwen's are."""
    from transformers import LlamaConfig, LlamaForCausalLM
    out = tmp_path_factory.mktemp('tiny_teacher')
    tok = build_tokenizer()
    eos = tok.convert_tokens_to_ids('<|endoftext|>')
    width = (len(tok) // 64 + 1) * 64
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=width, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def load_prepare():
    """data/shakespeare/prepare.py as a module, loaded by path the way train.py does."""
    path = ROOT / 'data' / 'shakespeare' / 'prepare.py'
    spec = importlib.util.spec_from_file_location('shakespeare_prepare', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='session')
def tiny_data(tiny_teacher, tmp_path_factory):
    """Directory of Shakespeare token files (train.bin, val.bin, meta.json) for the tiny teacher."""
    out = tmp_path_factory.mktemp('tiny_data')
    return load_prepare().prepare(tiny_teacher, out)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes more than a minute on a 2-core CPU')


@pytest.fixture(scope='session')
def tiny_examples(tiny_teacher, tmp_path_factory):
    """Instruction-style example data for the tiny teacher, in train.py's 'examples' format: {split}.bin (the
    examples' tokens, one after another), {split}.idx (int64 start, length per example), {split}.mask.bin (uint8,
    1 on answer tokens) and meta.json. Lengths vary from a few tokens to more than a 64-token block."""
    import json
    import random
    import numpy as np
    from transformers import AutoTokenizer
    from tokenizer import tokenizer_hash
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    eos = tok.convert_tokens_to_ids('<|endoftext|>')
    words = TEXT.split()
    rng = random.Random(0)
    out = tmp_path_factory.mktemp('tiny_examples')
    for split, count in (('train', 300), ('val', 40)):
        ids, spans, mask = [], [], []
        for _ in range(count):
            n = rng.choice([1, 2, 3, 5, 8, 13, 21, 34])
            prompt = tok.encode(f"Repeat: {' '.join(rng.sample(words, n))}\n")
            answer = tok.encode(' '.join(rng.sample(words, n))) + [eos]
            spans.append((len(ids), len(prompt) + len(answer)))
            ids += prompt + answer
            mask += [0] * len(prompt) + [1] * len(answer)
        np.array(ids, dtype=np.uint16).tofile(out / f'{split}.bin')
        np.array(spans, dtype=np.int64).tofile(out / f'{split}.idx')
        np.array(mask, dtype=np.uint8).tofile(out / f'{split}.mask.bin')
    (out / 'meta.json').write_text(json.dumps({
        'teacher': tiny_teacher, 'tokenizer_hash': tokenizer_hash(tok), 'dtype': 'uint16', 'eos_id': eos,
        'vocab_size': len(tok), 'format': 'examples', 'chat': True,
        'teacher_dtype': 'float32'}))  # no teacher answered these, but train.py checks it against its own dtype
    return str(out)
