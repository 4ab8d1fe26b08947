"""export.py: a student as a Hugging Face directory and as a GGUF file, read back by loaders written by others
(transformers' from_pretrained, its GGUF reader, gguf.GGUFReader) and held to the student: its float32 logits within
1e-4, its greedy continuation and its tokenization, for Llama- and Qwen2-shaped students on the teacher's tokenizer
and on their own BPE. The students come from train.py (a tiny run from scratch, one from a tiny Qwen2 teacher's
weights) or are random students in a checkpoint train.py wrote. Also --ema, the vocabulary of the embedded teacher's
own GGUF, old checkpoints, and the one-line refusals, which write nothing.
Run: python -m pytest tests/test_export.py          (the real Qwen2.5 tokenizer: python -m pytest -m slow)"""
import subprocess
import sys
from dataclasses import asdict, fields

import gguf
import pytest
import torch
from conftest import TEXT
from safetensors.torch import load_file
from test_inherit import QWEN_TOKENIZER, TEACHER_SIZES, save_teacher
from test_train import HANG_S, ROOT, run, tiny_args
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.gguf.reader import read_gguf_metadata

import export
import vocab
from checkpoint import load_student, save, tokenizer_files
from inherit import student_from_teacher
from model import Indra, IndraConfig
from teacher import EMBEDDED, load_tokenizer, package_path, resolve
from tokenizer import tokenizer_hash

PROMPT = 'ROMEO:'
CHAT = '<|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\n'  # specials stay whole


@pytest.fixture(scope='module')
def llama_run(tiny_teacher, tiny_data, tmp_path_factory):
    """train.py from scratch on the tiny Llama teacher: a SwiGLU student, 2 query heads over 1 key/value head, tied,
    with an EMA; 3 steps (its weights are still near their init, small)."""
    out = tmp_path_factory.mktemp('llama_run')
    run('train.py', *tiny_args(tiny_teacher, tiny_data, out, mlp='swiglu', n_kv_head=1, max_iters=3, eval_interval=3,
                               ema_decay=0.5, watch_tokens=0, plot=False))
    return out / 'best.pt'


@pytest.fixture(scope='module')
def qwen2_run(tiny_data, tmp_path_factory):
    """train.py --init_from=teacher from a tiny random Qwen2 (6 query heads over 2, random q/k/v biases and gains,
    weights large enough for logits of several units, an untied head) on the tiny teacher's tokenizer: 2 steps."""
    from conftest import build_tokenizer
    teacher, out = tmp_path_factory.mktemp('qwen2_teacher'), tmp_path_factory.mktemp('qwen2_run')
    save_teacher(teacher, 'qwen2', tie=False, vocab_size=512)
    build_tokenizer().save_pretrained(teacher)  # the tiny teacher's tokenizer: tiny_data's token files fit it
    run('train.py', *tiny_args(teacher, tiny_data, out, init_from='teacher', **TEACHER_SIZES, max_iters=2,
                               eval_interval=2, learning_rate=1e-3, watch_tokens=0, plot=False))
    return out / 'best.pt'


def loud(model):
    """Random weights large enough that a wrong row, a wrong head or a wrong rotation shows in the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.15 if p.ndim == 2 else
                    (1 + 0.3 * torch.randn_like(p)) if 'norm' in name else 0.3 * torch.randn_like(p))
    return model


def checkpoint_holding(base, path, model, teacher=None, **changes):
    """The checkpoint train.py wrote at base, holding model instead (and no EMA), with changes (another tokenizer, as
    train.py keeps one) and another teacher spec."""
    ckpt = torch.load(base, weights_only=True)
    ckpt.update(model=model.state_dict(), model_args=asdict(model.config), ema=None, **changes)
    if teacher is not None:
        ckpt['config']['teacher'] = teacher
    save(path, ckpt)
    return path


def own_bpe(bpe):
    return {'student_tokenizer': bpe.to_str(), 'eos_id': bpe.token_to_id(vocab.EOS)}


def teachers_tokenizer(tok):
    return {'tokenizer_files': tokenizer_files(tok), 'tokenizer_hash': tokenizer_hash(tok), 'eos_id': tok.eos_token_id}


def make_student(kind, llama_run, qwen2_run, tmp_path):
    """(checkpoint, the student in it, its tokenizer's encode, whether a chat template comes with it) for one kind."""
    if kind in ('llama', 'qwen2'):
        ckpt = llama_run if kind == 'llama' else qwen2_run
        model, saved = load_student(ckpt)
        tok, _ = load_tokenizer(saved['config']['teacher'])
        return ckpt, model, lambda text: tok(text, add_special_tokens=False).input_ids, True
    bpe = vocab.train_bpe([TEXT] * 4, 300)
    if kind == 'llama-own-bpe':  # untied, head_dim 12 where n_embd / n_head is 8, its own eps and rope base
        cfg = IndraConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=12,
                          mlp='swiglu', mlp_hidden=48, tie_head=False, norm_eps=1e-5, rope_base=50000.0)
    else:
        cfg = IndraConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=32, mlp='swiglu', qkv_bias=True)
    model = loud(Indra(cfg))
    ckpt = checkpoint_holding(llama_run, tmp_path / f'{kind}.pt', model, **own_bpe(bpe))
    return ckpt, model, lambda text: bpe.encode(text).ids, False


def texts(chat):
    return [PROMPT, *TEXT.splitlines()[:6], *([CHAT] if chat else [])]


def assert_same_model(student_model, loaded, encode):
    """The loaded model's float32 logits within 1e-4 of the student's, and the same 16-token greedy continuation."""
    x = torch.tensor([encode(' '.join(TEXT.split()[:40]))[:48]])
    with torch.no_grad():
        want, got = student_model(x)[0], loaded(input_ids=x).logits
    assert want.abs().max() > 0.3, "logits too small to tell a wrong layout from a right one"
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()
    prompt = torch.tensor([encode(PROMPT)])
    mine = student_model.generate(prompt, 16, temperature=0)
    theirs = loaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                             min_new_tokens=16, do_sample=False, eos_token_id=None)
    assert mine.tolist() == theirs.tolist()


@pytest.mark.parametrize('kind', ['llama', 'qwen2', 'llama-own-bpe'])
def test_the_hf_directory_is_the_student(kind, llama_run, qwen2_run, tmp_path):
    ckpt, model, encode, chat = make_student(kind, llama_run, qwen2_run, tmp_path)
    out = export.export(ckpt, tmp_path / 'x' / 'hf')
    assert [p.name for p in out.parent.iterdir()] == ['hf']  # the temporary directory is gone
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.architectures == ['Qwen2ForCausalLM' if model.config.qkv_bias else 'LlamaForCausalLM']
    assert_same_model(model, loaded, encode)
    tok = AutoTokenizer.from_pretrained(out)
    assert [tok(t, add_special_tokens=False).input_ids for t in texts(chat)] == [encode(t) for t in texts(chat)]
    assert bool(tok.chat_template) == chat and loaded.generation_config.eos_token_id == torch.load(
        ckpt, weights_only=True)['eos_id']
    # the one name table both ways: init_from='teacher' on the export gives back the student, bit for bit
    again, _, _ = student_from_teacher(out, dict(TEACHER_SIZES, block_size=model.config.block_size))
    mine = model.state_dict()
    assert all(torch.equal(p, mine[k]) for k, p in again.state_dict().items())


@pytest.mark.parametrize('kind', ['llama', 'qwen2', 'llama-own-bpe', 'qwen2-own-bpe'])
def test_the_gguf_file_is_the_student(kind, llama_run, qwen2_run, tmp_path):
    ckpt, model, encode, chat = make_student(kind, llama_run, qwen2_run, tmp_path)
    cfg = model.config
    out = export.export(ckpt, tmp_path / 'x' / 'student.gguf', 'gguf')
    assert [p.name for p in out.parent.iterdir()] == ['student.gguf']
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    assert_same_model(model, loaded, encode)
    tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert [tok(t, add_special_tokens=False).input_ids for t in texts(chat)] == [encode(t) for t in texts(chat)]

    reader = gguf.GGUFReader(out)

    def field(key):
        return reader.fields[key].contents()
    arch = 'qwen2' if cfg.qkv_bias else 'llama'
    assert field('general.architecture') == arch
    assert [field(f'{arch}.{k}') for k in ('block_count', 'embedding_length', 'attention.head_count',
                                           'attention.head_count_kv', 'attention.key_length', 'rope.dimension_count')] \
        == [cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.head_dim]
    assert field(f'{arch}.rope.freq_base') == pytest.approx(cfg.rope_base)
    # named for the split: GPT-2's for the tiny tokenizer and the own BPEs; the Qwen2 run's teacher directory gives
    # transformers' Qwen2Tokenizer (it reads every qwen2 directory's tokenizer so), which splits as Qwen2 does
    assert field('tokenizer.ggml.model') == 'gpt2' and field('tokenizer.ggml.pre') == \
        ('qwen2' if kind == 'qwen2' else 'gpt2')
    tokens, types = field('tokenizer.ggml.tokens'), field('tokenizer.ggml.token_type')
    assert len(tokens) == len(types) == cfg.vocab_size
    pads = [i for i, t in enumerate(tokens) if t.startswith('[PAD')]
    assert all(tokens[i] == f'[PAD{i}]' and types[i] == gguf.TokenType.UNUSED for i in pads)
    assert pads == list(range(cfg.vocab_size - len(pads), cfg.vocab_size))
    assert len(pads) == (12 if cfg.vocab_size == 512 else 0)  # the tiny teacher: 500 tokens under 512 logits
    assert field('tokenizer.ggml.eos_token_id') == torch.load(ckpt, weights_only=True)['eos_id']
    assert ('tokenizer.chat_template' in reader.fields) == chat
    # the rows of q in the file: adjacent (Re, Im) pairs for llama, [Re | Im] halves for qwen2 (export_gguf.py)
    q_hf = model.blocks[0].attn.qkv.weight.detach()[:cfg.n_head * cfg.head_dim]
    q = torch.from_numpy(next(t for t in reader.tensors if t.name == 'blk.0.attn_q.weight').data.copy())
    if arch == 'llama':
        q = q.reshape(cfg.n_head, cfg.head_dim // 2, 2, -1).transpose(1, 2).reshape(q_hf.shape)
    assert torch.equal(q, q_hf)


def test_a_qwen2_directory_whose_tokenizer_transformers_would_change_is_refused(llama_run, qwen2_run, tmp_path):
    """transformers reads every qwen2 directory's tokenizer as a Qwen2Tokenizer, which splits text Qwen2's way: a
    Qwen2-shaped student on a GPT-2-split BPE would be read with other token ids, so its HF export is one line (the
    GGUF above keeps its split) and writes nothing."""
    ckpt, _, _, _ = make_student('qwen2-own-bpe', llama_run, qwen2_run, tmp_path)
    with pytest.raises(SystemExit, match=r"reads the tokenizer of a qwen2 directory as Qwen2Tokenizer, which tokenizes "
                                         r".* otherwise than this student's tokenizer; export it with --format gguf"):
        export.export(ckpt, tmp_path / 'x' / 'hf')
    assert not (tmp_path / 'x' / 'hf').exists() and list((tmp_path / 'x').iterdir()) == []


def test_sample_py_greedy_is_transformers_greedy_on_the_export(qwen2_run, tmp_path):
    """sample.py --temperature 0 continues "ROMEO:" exactly as transformers' greedy generate on the export does."""
    out = export.export(qwen2_run, tmp_path / 'hf')
    stdout = run('sample.py', f'--ckpt={qwen2_run}', f'--prompt={PROMPT}', '--temperature=0', '--num_samples=1',
                 '--max_new_tokens=20')
    tok = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = tok(PROMPT, return_tensors='pt')
    new = hf.generate(**x, max_new_tokens=20, do_sample=False)[0, x.input_ids.shape[1]:]
    assert stdout.split('-' * 60 + '\n', 1)[1] == PROMPT + tok.decode(new, skip_special_tokens=True) + '\n'


def test_ema_exports_the_ema_weights(llama_run, tmp_path):
    out = export.export(llama_run, tmp_path / 'hf', ema=True)
    ema, _ = load_student(llama_run, ema=True)
    raw, _ = load_student(llama_run)
    weights = load_file(out / 'model.safetensors')['model.embed_tokens.weight']
    assert torch.equal(weights, ema.wte.weight) and not torch.equal(weights, raw.wte.weight)


def test_the_embedded_teacher_gguf_vocabulary(llama_run, tmp_path):
    """A student on the embedded SmolLM2's tokenizer gets the teacher's own GGUF vocabulary: its tokens, token types,
    merges, special ids, chat template and pre-tokenizer name ('smollm', copied from that file)."""
    tok = AutoTokenizer.from_pretrained(resolve('smollm2-135m-instruct'))
    model = Indra(IndraConfig(vocab_size=49152, block_size=64, n_layer=1, n_head=2, n_embd=16, mlp='swiglu'))
    checkpoint_holding(llama_run, tmp_path / 'smol.pt', model, 'smollm2-135m-instruct', **teachers_tokenizer(tok))
    out = export.export(tmp_path / 'smol.pt', tmp_path / 'smol.gguf', 'gguf')
    arrays = ('tokenizer.ggml.tokens', 'tokenizer.ggml.token_type', 'tokenizer.ggml.merges')
    mine, _ = read_gguf_metadata(out, arrays)  # transformers' own reader: 0.3 s a file here, GGUFReader's 4 s
    theirs, _ = read_gguf_metadata(package_path(*EMBEDDED['smollm2-135m-instruct']), arrays)
    for key in (*arrays, 'tokenizer.ggml.pre', 'tokenizer.ggml.bos_token_id', 'tokenizer.ggml.eos_token_id',
                'tokenizer.ggml.unknown_token_id', 'tokenizer.ggml.padding_token_id', 'tokenizer.ggml.add_bos_token',
                'tokenizer.chat_template'):
        assert mine[key] == theirs[key], key
    assert mine['tokenizer.ggml.pre'] == 'smollm'


@pytest.mark.slow
def test_a_qwen2_student_on_the_real_qwen25_tokenizer(llama_run, tmp_path):
    """Qwen2.5's tokenizer (151,669 tokens under 151,936 logits): the GGUF pads the vocabulary with [PAD<id>]
    placeholders, names the pre-tokenizer 'qwen2', and transformers reads back the same token ids and logits, from
    the GGUF file and from the HF directory."""
    files = package_path(*QWEN_TOKENIZER).parent
    tok = AutoTokenizer.from_pretrained(files)
    model = loud(Indra(IndraConfig(vocab_size=151936, block_size=64, n_layer=1, n_head=2, n_embd=16, mlp='swiglu',
                                   qkv_bias=True)))
    checkpoint_holding(llama_run, tmp_path / 'qwen.pt', model, str(files), **teachers_tokenizer(tok))
    out = export.export(tmp_path / 'qwen.pt', tmp_path / 'qwen.gguf', 'gguf')
    reader = gguf.GGUFReader(out)
    tokens = reader.fields['tokenizer.ggml.tokens'].contents()
    assert reader.fields['tokenizer.ggml.pre'].contents() == 'qwen2' and len(tokens) == 151936
    assert tokens[len(tok):] == [f'[PAD{i}]' for i in range(len(tok), 151936)]
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    chat = tok.apply_chat_template([{'role': 'user', 'content': 'What is 7 + 45?'}], tokenize=False,
                                   add_generation_prompt=True)
    for text in [chat, *TEXT.splitlines(), "  indented\n\n\ttabs 1234567 ١٢٣ 日本語のテキスト"]:
        assert back(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    encode = lambda text: tok(text, add_special_tokens=False).input_ids
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    assert_same_model(model, loaded, encode)
    hf = export.export(tmp_path / 'qwen.pt', tmp_path / 'hf')  # and as a directory: Qwen2Tokenizer is this one
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval(), encode)
    assert AutoTokenizer.from_pretrained(hf)(chat, add_special_tokens=False).input_ids == encode(chat)


def test_half_precision_exports(qwen2_run, tmp_path):
    """--dtype bfloat16 / float16: the weights in that dtype (GGUF: norms and biases stay float32), loaded by both
    readers, logits within that dtype's rounding of the student's."""
    model, _ = load_student(qwen2_run)
    x = torch.arange(40).view(1, 40) * 7 % 500
    with torch.no_grad():
        want = model(x)[0]
        for dtype, fmt in (('bfloat16', 'hf'), ('float16', 'gguf'), ('bfloat16', 'gguf')):
            out = export.export(qwen2_run, tmp_path / f'{dtype}.{fmt}', fmt, dtype)
            if fmt == 'hf':
                assert load_file(out / 'model.safetensors')['model.norm.weight'].dtype == getattr(torch, dtype)
                got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(x).logits
            else:
                kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
                assert kinds['blk.0.attn_q.weight'] == {'float16': 'F16', 'bfloat16': 'BF16'}[dtype]
                assert kinds['blk.0.attn_q.bias'] == kinds['output_norm.weight'] == 'F32'
                got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)(x).logits
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert 0 < err < (0.05 if dtype == 'bfloat16' else 0.01), (dtype, fmt, err)


def test_every_student_setting_is_placed():
    """Each IndraConfig field is either held by a Llama / Qwen2 config or refused: a new setting must be placed."""
    placed = set(export.HELD) | set(export.REFUSED)
    assert placed == {f.name for f in fields(IndraConfig)} and not set(export.HELD) & set(export.REFUSED)


def export_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / 'export.py'), *map(str, args)], capture_output=True, text=True,
                          timeout=HANG_S, check=False)


def test_what_cannot_be_exported_is_one_line_and_nothing_is_written(llama_run, tmp_path):
    gelu = Indra(IndraConfig(vocab_size=512, block_size=64, n_layer=1, n_head=2, n_embd=32, logit_clamp=30.0))
    bad = checkpoint_holding(llama_run, tmp_path / 'gelu.pt', gelu)
    (tmp_path / 'garbage.pt').write_bytes(b'not a checkpoint')
    cases = [(bad, [], ("mlp='gelu': Llama and Qwen2 have SwiGLU MLPs (train with --mlp=swiglu); logit_clamp=30: "
                        "neither bounds its logits")),
             (tmp_path / 'garbage.pt', ['--format', 'gguf'], 'cannot be read'),
             (bad, ['--ema'], 'has no EMA weights (trained with ema_decay=0); drop --ema')]
    for ckpt, extra, message in cases:
        r = export_cli('--ckpt', ckpt, '--out', tmp_path / 'out', *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['garbage.pt', 'gelu.pt']
    (tmp_path / 'out').mkdir()
    with pytest.raises(SystemExit, match='out exists; remove it or pass another --out'):
        export.export(llama_run, tmp_path / 'out')


def test_an_old_checkpoint_takes_its_teachers_tokenizer_while_it_resolves(llama_run, tmp_path, capsys):
    ckpt = torch.load(llama_run, weights_only=True)
    del ckpt['tokenizer_files']  # as checkpoints were before they kept it
    save(tmp_path / 'old.pt', ckpt)
    out = export.export(tmp_path / 'old.pt', tmp_path / 'hf')
    assert 'saved before checkpoints kept their tokenizer' in capsys.readouterr().out
    assert (out / 'tokenizer.json').exists()
    ckpt['config']['teacher'] = str(tmp_path / 'gone')
    save(tmp_path / 'gone.pt', ckpt)
    with pytest.raises(SystemExit, match=r"keeps no tokenizer .* its teacher '.*gone' is gone"):
        export.export(tmp_path / 'gone.pt', tmp_path / 'hf2')
    assert not (tmp_path / 'hf2').exists()
