"""A tiny chat LM folder for command tests: a Llama from a config plus a word-level tokenizer with a
ChatML template, built offline in a second (no hub, no embedded package needed, so CI can run it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("what is a computer virus do you like to read books hello hi there i am fine thanks how are "
         "the weather today good bad yes no maybe python code program software hardware help me please "
         "tell story about cats dogs music science art history math").split()
SPECIAL = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "\n", ".", "?", ",", " "]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + list(dict.fromkeys(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|im_(start|end)\|>|\n|[.?,]|\w+| "), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_llm(folder: Path, *, hidden: int = 32, layers: int = 2, vocab: int | None = None, seed: int = 0) -> Path:
    """Write a random tiny LlamaForCausalLM and its tokenizer to ``folder``; returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def write_chat_jsonl(path: Path, rows: int = 48) -> Path:
    """Prompt/response rows from the tiny vocabulary; replies follow a learnable pattern."""
    prompts = ["what is a computer virus ?", "do you like to read books ?", "hello how are you ?",
               "tell me a story about cats .", "what is python ?", "how is the weather today ?"]
    replies = ["a computer virus is bad software .", "yes i like to read books about science .",
               "i am fine thanks .", "cats like music and math .", "python is a program code .",
               "the weather is good today ."]
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            handle.write(json.dumps({"prompt": prompts[i % 6], "response": replies[i % 6]}) + "\n")
    return path
