"""
The student as one GGUF file for llama.cpp (and Ollama, which runs llama.cpp), written with the gguf package:
the architecture's metadata, the tokenizer, and every tensor under its llama.cpp name in the layout llama.cpp
expects. export.py calls it (python export.py --format gguf); tests/test_export.py reads the file back with
transformers and with gguf.GGUFReader.

One rotary head, two layouts. Hugging Face (and indra) keep a head's d features in halves, rotating the pairs
(i, i + d/2): [Re | Im]. llama.cpp's `llama` architecture rotates adjacent pairs (2i, 2i + 1) instead, so its
converter from Hugging Face reorders the rows of q and k in every head to Re_0, Im_0, Re_1, Im_1, ... (rows
reshaped to (n_head, 2, d/2, ...), the two middle axes swapped), and transformers undoes that when it reads a
GGUF back. Its `qwen2` architecture rotates halves (NEOX-style), so there the rows stay as they are.

Float only: float32, float16 or bfloat16 for the matrices, norms and biases in float32 as llama.cpp's converter
keeps them. No quantized type is written: none could be run through llama.cpp here to prove it.
"""
import json
from pathlib import Path

import gguf
import numpy as np

from teacher import EMBEDDED, package_path
from tokenizer import GPT2_DIGITS_PATTERN, GPT2_PATTERN, _pretokenizer_pattern

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")  # Qwen2's split, as its tokenizer.json has it
# tokenizer.ggml.pre names how llama.cpp splits text before the merges; each name here is llama.cpp's for that split
PRE_TOKENIZERS = {GPT2_PATTERN: 'gpt2',  # GPT-2's regex: a student's own BPE (vocab.py: ByteLevel(use_regex=True))
                  GPT2_DIGITS_PATTERN: 'smollm',  # every digit alone, then GPT-2's regex: SmolLM's
                  QWEN2_PATTERN: 'qwen2'}
FILE_TYPES = {'float32': gguf.LlamaFileType.ALL_F32, 'float16': gguf.LlamaFileType.MOSTLY_F16,
              'bfloat16': gguf.LlamaFileType.MOSTLY_BF16}


def fail(msg):
    raise SystemExit(f"indra: {msg}")


def teacher_gguf(spec):
    """The teacher's own .gguf file if it came from one (the embedded teacher, or a .gguf path still there)."""
    if spec in EMBEDDED:
        return package_path(*EMBEDDED[spec])
    path = Path(spec).expanduser() if spec else None
    return path if path is not None and path.suffix == '.gguf' and path.is_file() else None


def pre_tokenizer(tok, spec):
    """(tokenizer.ggml.pre, where it came from): the teacher's GGUF's own where there is one (spec: the teacher, or
    None for a student's own BPE), else llama.cpp's name for this tokenizer's split."""
    source = teacher_gguf(spec)
    if source is not None:
        return str(gguf.GGUFReader(source).fields['tokenizer.ggml.pre'].contents()), f"from {source.name}"
    pattern, why = _pretokenizer_pattern(json.loads(tok.backend_tokenizer.to_str()).get('pre_tokenizer'))
    if pattern not in PRE_TOKENIZERS:
        fail(f"this tokenizer splits text in a way export names no llama.cpp pre-tokenizer for ({why or pattern}); "
             f"GGUF export knows GPT-2's, SmolLM's and Qwen2's splits: use --format hf")
    return PRE_TOKENIZERS[pattern], 'named for its split'


def vocabulary(tok, width):
    """(tokens, token types, merges) for tokenizer.ggml.*: one token per logit, as llama.cpp's converter makes them:
    an added special token is CONTROL, another added one USER_DEFINED, and an id past the tokenizer (Qwen has more
    logits than tokens) a placeholder [PAD<id>] of type UNUSED, which no text encodes to."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec['model']['type'] != 'BPE' or (spec.get('decoder') or {}).get('type') != 'ByteLevel':
        fail(f"GGUF export writes byte-level BPE tokenizers (llama.cpp's 'gpt2' model); this one is a "
             f"{spec['model']['type']}: use --format hf")
    by_id = {i: t for t, i in tok.get_vocab().items()}
    if max(by_id) >= width:
        fail(f"the tokenizer has id {max(by_id)}, past the student's {width} logits; it is not this student's")
    added, tokens, types = tok.added_tokens_decoder, [], []
    for i in range(width):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id.get(i, f'[PAD{i}]'))
            types.append(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else ' '.join(m) for m in spec['model']['merges']]
    return tokens, types, merges


def gguf_tensors(config, tensors, dtype):
    """[(llama.cpp name, numpy array, GGML type)] from the Hugging Face tensors, named by the gguf package's own map
    for the architecture; q and k reordered for `llama` (the module docstring says why)."""
    arch = gguf.MODEL_ARCH.LLAMA if config.model_type == 'llama' else gguf.MODEL_ARCH.QWEN2
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = {'q_proj': config.num_attention_heads, 'k_proj': config.num_key_value_heads}
    out = []
    for hf_name, t in tensors.items():
        name = names.get_name(hf_name, try_suffixes=('.weight', '.bias'))
        assert name is not None, f"the gguf package has no {gguf.MODEL_ARCH_NAMES[arch]} tensor for {hf_name}"
        kind = hf_name.split('.')[-2]
        if arch == gguf.MODEL_ARCH.LLAMA and kind in heads:  # (n_head * d, C) rows -> adjacent (Re, Im) pairs
            n = heads[kind]
            t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        a = t.numpy()
        if a.ndim == 1 or dtype == 'float32':
            out.append((name, a, gguf.GGMLQuantizationType.F32))
        elif dtype == 'float16':
            out.append((name, a.astype(np.float16), gguf.GGMLQuantizationType.F16))
        else:
            out.append((name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16))
    return out


def gguf_plan(config, tensors, tok, spec, dtype):
    """Check the tokenizer and name every tensor now; return write(path), which writes the GGUF file at path."""
    pre, whence = pre_tokenizer(tok, spec)
    tokens, types, merges = vocabulary(tok, config.vocab_size)
    arrays = gguf_tensors(config, tensors, dtype)
    print(f"GGUF: architecture {config.model_type}, {len(tokens):,} tokens ({types.count(gguf.TokenType.UNUSED)} "
          f"[PAD] placeholders for logits past the tokenizer), pre-tokenizer {pre!r} ({whence})")

    def write(path):
        w = gguf.GGUFWriter(path, config.model_type)  # the architecture's name is its Hugging Face model_type
        w.add_name('indra student')
        w.add_file_type(FILE_TYPES[dtype])
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
        w.add_rope_dimension_count(config.head_dim)
        w.add_rope_freq_base(config.rope_parameters['rope_theta'])
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_vocab_size(config.vocab_size)
        w.add_tokenizer_model('gpt2')  # llama.cpp's name for byte-level BPE
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(config.eos_token_id)
        w.add_pad_token_id(config.pad_token_id)
        for token_id, add in ((tok.bos_token_id, w.add_bos_token_id), (tok.unk_token_id, w.add_unk_token_id)):
            if token_id is not None:
                add(token_id)
        w.add_add_bos_token(False)  # the student never saw a BOS: train.py and sample.py encode without one
        if tok.chat_template:
            w.add_chat_template(tok.chat_template)
        for name, array, kind in arrays:
            w.add_tensor(name, array, raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return write
