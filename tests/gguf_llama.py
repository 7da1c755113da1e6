"""A tiny random Llama as a transformers model and as the base GGUF llama.cpp loads (engine tests only).

The GGUF is written with the ``gguf`` package: every weight in F32 (exact), the hyperparameters llama.cpp's
llama architecture reads, and a SentencePiece-style vocabulary (``tokenizer.ggml.model = "llama"``):

    0 <unk>, 1 <s>, 2 </s>, 3..258 the 256 byte tokens <0x00>..<0xFF>, then NORMAL pieces "▁t0", "▁t1", ...

llama.cpp needs a vocabulary to load a model; the tests feed token ids directly, so the pieces are only
names. Tensor names come from gguf's name map; q_proj / k_proj rows are reordered for llama.cpp's RoPE by
``rope_rows``, written here from the index formula rather than taken from the exporter under test.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

N_SPECIAL, N_BYTES = 3, 256


def engine_llama(seed: int = 0, vocab: int = 320, hidden: int = 64) -> LlamaForCausalLM:
    """LlamaForCausalLM: 2 layers, 4 heads / 2 kv heads (head_dim hidden/4), a byte-level vocabulary's size."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         attention_dropout=0.0, attn_implementation="eager", architectures=["LlamaForCausalLM"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        for parameter in model.parameters():  # larger than the 0.02 init so the logits are not all ~0
            torch.nn.init.normal_(parameter, std=0.1)
    return model.eval()


def rope_rows(out_features: int, heads: int) -> torch.Tensor:
    """Source row of each llama.cpp row: per head of size d, row h*d + 2i + j takes HF row h*d + j*d/2 + i.

    transformers' RoPE rotates the pair (i, i + d/2) of a head, llama.cpp's rotates (2i, 2i + 1).
    """
    d = out_features // heads
    return torch.tensor([h * d + j * (d // 2) + i for h in range(heads) for i in range(d // 2) for j in range(2)])


def spm_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, token types) of a byte-fallback SentencePiece vocabulary of ``size`` tokens."""
    import gguf

    kinds = gguf.TokenType
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(N_BYTES)]
    types = [kinds.UNKNOWN, kinds.CONTROL, kinds.CONTROL] + [kinds.BYTE] * N_BYTES
    normal = size - len(pieces)
    pieces += [f"\u2581t{i}" for i in range(normal)]
    types += [kinds.NORMAL] * normal
    scores = [0.0] * (N_SPECIAL + N_BYTES) + [-float(i) for i in range(normal)]
    return pieces, scores, [int(kind) for kind in types]


def write_base_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    """``model`` as an F32 llama GGUF with a vocabulary; returns ``path``."""
    import gguf

    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path=None, arch="llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("lorakit-engine-test")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    pieces, scores, types = spm_vocab(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for key, weight in model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        module = key.rsplit(".", 2)[-2]
        if module in heads:
            weight = weight[rope_rows(weight.shape[0], heads[module])]
        writer.add_tensor(name, weight.detach().to(torch.float32).contiguous().numpy(),
                          raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
