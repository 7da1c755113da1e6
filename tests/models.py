"""Tiny, seeded models for tests, and deterministic inputs for each.

Every factory takes a ``seed``: two calls with the same seed give bit-identical weights, so a test can
build the same model twice and hand one copy to PEFT and the other to lorakit. The global RNG is left
untouched (``fork_rng``), so building a model does not change what later random calls return.

All dropout probabilities of the base models are 0: train-mode outputs are then deterministic and can be
compared between two implementations.

Usage::

    model = build("llama", seed=0)
    out = model(**example_inputs("llama"))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 128  # shared by the transformers models so one input table fits all
BATCH, SEQ = 2, 8


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Run ``make`` under ``seed`` without disturbing the caller's RNG; return the model in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    return model.eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """LlamaForCausalLM: 2 layers, hidden 32, 4 heads / 2 kv heads (GQA), untied lm_head."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        attn_implementation="eager",
    )
    return _seeded(seed, lambda: LlamaForCausalLM(config))


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT2LMHeadModel: 2 blocks of transformers ``Conv1D`` layers (weight stored (in, out)), tied lm_head."""
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,  # GPT2Config's defaults (50256) lie outside the tiny vocabulary
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return _seeded(seed, lambda: GPT2LMHeadModel(config))


def _bert_config(**extra) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        # BERT's default 0.02 leaves the seq-cls logits nearly blind to the encoder (a 1% change in LoRA
        # scaling moves them by ~1e-5); a wider init makes the encoder's effect visible at atol=1e-5.
        initializer_range=0.2,
        attn_implementation="eager",
        **extra,
    )


def tiny_bert(seed: int = 0) -> BertModel:
    """BertModel (encoder + pooler), 2 layers, hidden 32."""
    config = _bert_config()
    return _seeded(seed, lambda: BertModel(config))


def tiny_bert_seq_cls(seed: int = 0) -> BertForSequenceClassification:
    """BertForSequenceClassification with 3 labels (its head is ``classifier``)."""
    config = _bert_config(num_labels=3)
    return _seeded(seed, lambda: BertForSequenceClassification(config))


class TinyMLP(nn.Module):
    """A plain nn.Module (no ``config``) with one layer of each basic LoRA kind.

    ids (B, 16) -> emb (B, 16, 8) -> as an image (B, 8, 4, 4) -> conv 3x3 (B, 4, 4, 4) -> flatten (B, 64)
    -> lin1 (B, 32) -> relu -> lin2 (B, 5).
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(8, 4, kernel_size=3, padding=1)
        self.lin1 = nn.Linear(64, 32)
        self.lin2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)  # (B, 16, 8)
        h = h.transpose(1, 2).reshape(x.shape[0], 8, 4, 4)
        h = self.conv(h).flatten(1)
        return self.lin2(torch.relu(self.lin1(h)))


def tiny_mlp(seed: int = 0) -> TinyMLP:
    return _seeded(seed, TinyMLP)


FACTORIES: dict[str, Callable[[int], nn.Module]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "bert_seq_cls": tiny_bert_seq_cls,
    "mlp": tiny_mlp,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The model called ``name`` in FACTORIES, with weights drawn from ``seed``."""
    return FACTORIES[name](seed)


def example_inputs(name: str, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Deterministic keyword inputs for the model ``name`` (pass as ``model(**inputs)``).

    The transformers models get a padded second row (attention_mask zeros at the end) so that the mask
    path is exercised too.
    """
    gen = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return {"x": torch.randint(0, 20, (BATCH, 16), generator=gen)}
    if name not in FACTORIES:
        raise KeyError(f"no inputs for model {name!r}; known: {sorted(FACTORIES)}")
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, -3:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if name.startswith("bert"):
        token_type_ids = torch.zeros(BATCH, SEQ, dtype=torch.long)
        token_type_ids[:, SEQ // 2 :] = 1
        inputs["token_type_ids"] = token_type_ids
    return inputs
