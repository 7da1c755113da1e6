"""The training loop's loss normalisation: a step's gradient is ∇ Σ_{reply tokens} ℓ / n̄ with the constant
n̄ = batch_size · mean reply tokens per example, so every reply token weighs the same whatever the length of
its batch (a per-batch mean gave the short-reply batches of length bucketing more weight)."""

from __future__ import annotations

import torch
from models import tiny_llama

from lorakit import LoraConfig, get_peft_model
from lorakit.app.sft import Example, batches, collate
from lorakit.app.training import TrainSettings, TrainState, mean_batch_tokens, train_loop

PAD = 0


def _examples() -> list[Example]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for length, reply in [(6, 2), (7, 2), (14, 11), (16, 12), (5, 1), (12, 9)]:  # short and long replies
        ids = torch.randint(1, 100, (length,), generator=g).tolist()
        rows.append(Example(ids, [-100] * (length - reply) + ids[length - reply:]))
    return rows


def _model():
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0, init_lora_weights=False))


def test_mean_batch_tokens():
    examples = _examples()
    assert mean_batch_tokens(examples, 2) == 2 * (2 + 2 + 11 + 12 + 1 + 9) / 6  # label[0] is never a target


def test_each_step_is_the_gradient_of_the_token_sum_over_n_bar():
    """Two SGD steps (lr 1, no clipping) of the loop equal two by hand: p ← p − ∇ Σ ℓ / n̄ / grad_accum. (The
    second step caught n̄ being overwritten by the gradient norm inside the loop.)"""
    examples, settings = _examples(), TrainSettings(max_steps=2, batch_size=2, grad_accum=2, lr=1.0, warmup_steps=0,
                                                    max_grad_norm=1e9)
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    train_loop(model, examples, settings, PAD, TrainState(), optimizer,
               torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    reference = _model()
    n_bar = mean_batch_tokens(examples, 2)
    stream = [*batches(examples, 2, 0, 0), *batches(examples, 2, 0, 1)]  # the loop's endless seeded epochs
    sizes = [sum(sum(label != -100 for label in e.labels[1:]) for e in b) for b in stream[:4]]
    assert len(set(sizes)) > 1  # batches of different reply counts: a per-batch mean would weigh them apart
    for step in range(2):
        total = 0.0
        for batch in stream[2 * step : 2 * step + 2]:
            inputs = collate(batch, PAD)
            logits = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            total = total + torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                              inputs["labels"][:, 1:].reshape(-1), reduction="sum")
        (total / n_bar / 2).backward()
        with torch.no_grad():
            for parameter in reference.parameters():
                if parameter.requires_grad:
                    parameter -= parameter.grad
                    parameter.grad = None
    trained = dict(model.named_parameters())
    for name, parameter in reference.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(trained[name].detach(), parameter.detach(), rtol=1e-4, atol=1e-6)
