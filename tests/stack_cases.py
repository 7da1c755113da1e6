"""The training stack, run as a user would: transformers' Trainer, TRL's SFTTrainer and a transformers model's own
adapter API, each on a tiny random Llama (tied embeddings, like SmolLM2) with lorakit and no workaround.

Each case writes into ``out``: the adapter folder ``out/adapter`` (what ``save_model`` / ``save_pretrained``
wrote), ``out/result.json`` (losses on a fixed batch before and after training, the largest change of a
trainable weight) and ``out/logits.pt`` (the trained model's logits on ``PROBE``). The tests run every case
in-process (peft installed) and again in a child process where peft cannot be imported
(``no_peft.run``), then check the numbers and load each folder with peft and lorakit.

Run as a script (``python stack_cases.py MODEL_DIR OUT CASE...``), it runs the named cases.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROWS = torch.tensor([[13, 20, 31, 14, 25, 40, 17, 33, 22, 45, 19, 28]] * 8)  # one sequence: a learnable batch
PROBE = torch.tensor([[13, 20, 31, 14, 25, 40], [44, 12, 30, 27, 16, 38]])
CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _batch_loss(model: torch.nn.Module, rows: torch.Tensor = ROWS[:4]) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=rows, labels=rows).loss.item()
    model.train(was_training)
    return loss


def _dataset():  # noqa: ANN202 - a datasets.Dataset, with a column the model's forward does not take
    from datasets import Dataset

    ids = ROWS.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "labels": ids,
                              "text": ["unused"] * len(ids)})


def _finish(out: Path, trainer: object, before: float, trainable_before: dict[str, torch.Tensor],
            rows: torch.Tensor = ROWS[:4]) -> None:
    # without accelerate's bf16 autocast wrapper: the reference logits are float32 ones
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    after = _batch_loss(model, rows)
    params = dict(model.named_parameters())
    change = max((params[n].detach().float() - w).abs().max().item() for n, w in trainable_before.items())
    model.eval()
    with torch.no_grad():
        torch.save(model(input_ids=PROBE).logits.float(), out / "logits.pt")
    (out / "result.json").write_text(json.dumps({"before": before, "after": after, "change": change}))


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _lorakit_llama(model_dir: Path, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    import lorakit

    torch.manual_seed(seed)
    return lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                  lorakit.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **CONFIG))


def _train(model: torch.nn.Module, out: Path, **arguments: object) -> None:
    from transformers import Trainer, TrainingArguments

    before, weights = _batch_loss(model), _trainable(model)
    args = TrainingArguments(output_dir=str(out / "run"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=2e-2, use_cpu=True, report_to="none", save_strategy="no", **arguments)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    _finish(out, trainer, before, weights)
    # evaluate() reports the loss only when Trainer finds the wrapped model's label names
    result = json.loads((out / "result.json").read_text())
    result["eval_loss"] = trainer.evaluate(_dataset())["eval_loss"]
    (out / "result.json").write_text(json.dumps(result))


def trainer_default(model_dir: Path, out: Path) -> None:
    """``Trainer`` with default arguments (``remove_unused_columns=True``: the "text" column is dropped)."""
    _train(_lorakit_llama(model_dir), out)


def trainer_bf16_checkpointing(model_dir: Path, out: Path) -> None:
    """``Trainer(bf16=True, gradient_checkpointing=True)`` on CPU."""
    _train(_lorakit_llama(model_dir), out, bf16=True, gradient_checkpointing=True)


def _sft(model: object, out: Path, tokenizer_dir: Path, **kwargs: object) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    prompt, completion = "what is python ?", " python is a program code ."
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = Dataset.from_dict({"prompt": [prompt] * 8, "completion": [completion] * 8})
    batch = torch.tensor([tokenizer(prompt + completion)["input_ids"]] * 4)  # the text SFT trains on
    args = SFTConfig(output_dir=str(out / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=2e-2,
                     use_cpu=True, report_to="none", save_strategy="no", gradient_checkpointing=True)
    # SFTConfig trains in bf16 by default: the fused LoRA op under CPU autocast
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, **kwargs)
    before, weights = _batch_loss(trainer.model, batch), _trainable(trainer.model)
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    _finish(out, trainer, before, weights, batch)


def sft_model(model_dir: Path, out: Path) -> None:
    """``SFTTrainer(model=<lorakit PeftModel>)``, then ``save_model`` (tied embeddings)."""
    _sft(_lorakit_llama(model_dir), out, model_dir)


def sft_peft_config(model_dir: Path, out: Path) -> None:
    """``SFTTrainer(model=<path>, peft_config=lorakit.LoraConfig(...))``."""
    import lorakit

    _sft(str(model_dir), out, model_dir,
         peft_config=lorakit.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **CONFIG))


def transformers_add_adapter(model_dir: Path, out: Path) -> None:
    """``model.add_adapter(lorakit.LoraConfig(...))`` on a transformers model, trained by ``Trainer``, whose
    ``save_model`` then writes the adapter through transformers' own ``save_pretrained``."""
    from transformers import AutoModelForCausalLM

    import lorakit

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    model.add_adapter(lorakit.LoraConfig(init_lora_weights=False, **CONFIG))
    assert model.active_adapters() == ["default"] and model._hf_peft_config_loaded
    _train(model, out)


def transformers_load(model_dir: Path, out: Path) -> None:
    """``model.load_adapter(folder)`` and ``AutoModelForCausalLM.from_pretrained(folder)`` of ``out/adapter``
    (written by another case); their logits on ``PROBE`` go to ``loaded.pt`` and ``from_pretrained.pt``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.load_adapter(str(out / "adapter"))
    again = AutoModelForCausalLM.from_pretrained(str(out / "adapter"))
    for name, loaded in (("loaded", model), ("from_pretrained", again)):
        with torch.no_grad():
            torch.save(loaded.eval()(input_ids=PROBE).logits.float(), out / f"{name}.pt")


CASES: dict[str, Callable[[Path, Path], None]] = {
    "trainer_default": trainer_default,
    "trainer_bf16_checkpointing": trainer_bf16_checkpointing,
    "sft_model": sft_model,
    "sft_peft_config": sft_peft_config,
    "transformers_add_adapter": transformers_add_adapter,
}


def check(model_dir: Path, case_dir: Path) -> None:
    """Assert what every case must show: training lowered the loss and moved the adapter; the folder is a PEFT
    adapter folder (no base weights) that peft and lorakit load to the trained model's logits, as did
    transformers' ``load_adapter`` and ``from_pretrained`` in the run."""
    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import lorakit

    result = json.loads((case_dir / "result.json").read_text())
    assert result["after"] < result["before"] - 0.05, result
    assert result["change"] > 0.01, result
    if "eval_loss" in result:  # Trainer's evaluate() on the training rows: the loss after training (bf16: 0.05)
        assert abs(result["eval_loss"] - result["after"]) < 0.05, result
    folder = case_dir / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "model.safetensors").exists()
    keys = load_file(folder / "adapter_model.safetensors").keys()
    assert len(keys) == 8 and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys), keys
    expected = torch.load(case_dir / "logits.pt")
    for loader in (peft.PeftModel.from_pretrained, lorakit.PeftModel.from_pretrained):
        loaded = loader(AutoModelForCausalLM.from_pretrained(model_dir), str(folder)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=PROBE).logits, expected, atol=2e-5, rtol=1e-5)
    for name in ("loaded", "from_pretrained"):
        torch.testing.assert_close(torch.load(case_dir / f"{name}.pt"), expected, atol=2e-5, rtol=1e-5)


def run_with_and_without_peft(model_dir: Path, tmp_path_factory: object, names: list[str]) -> dict[str, Path]:
    """Run the named cases here (peft importable) and in a child process where peft cannot be found:
    {"peft": folder, "no_peft": folder}, each holding one sub-folder per case."""
    from no_peft import run as run_without_peft

    with_peft, without = tmp_path_factory.mktemp("with_peft"), tmp_path_factory.mktemp("without_peft")
    run(model_dir, with_peft, names)
    child = run_without_peft(f"import stack_cases, pathlib\nstack_cases.run(pathlib.Path({str(model_dir)!r}), "
                             f"pathlib.Path({str(without)!r}), {names!r})", without)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-6000:]
    return {"peft": with_peft, "no_peft": without}


def assert_same_adapter(runs: dict[str, Path], case: str) -> None:
    """The adapter a case trained with peft installed equals the one trained without it, tensor by tensor."""
    from safetensors.torch import load_file

    with_peft, without = (load_file(runs[m] / case / "adapter" / "adapter_model.safetensors") for m in runs)
    assert with_peft.keys() == without.keys()
    for key in with_peft:
        torch.testing.assert_close(without[key], with_peft[key], atol=1e-6, rtol=1e-6)


def run(model_dir: Path, out: Path, names: list[str]) -> None:
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
        CASES[name](model_dir, out / name)
        transformers_load(model_dir, out / name)


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
