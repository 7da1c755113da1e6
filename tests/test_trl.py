"""TRL 1.16's SFTTrainer with lorakit, with peft installed and in a child process where it is not:
``SFTTrainer(model=<lorakit model>)`` and ``SFTTrainer(peft_config=lorakit.LoraConfig(...))`` train (loss down,
adapter moved), ``save_model`` writes a PEFT adapter folder on a tied-embedding model, and that folder loads in
peft, lorakit and transformers to the trained model's logits (stack_cases.check)."""

from __future__ import annotations

import pytest
import stack_cases
import tiny_lm

CASES = ["sft_model", "sft_peft_config"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_lm.save_tiny_llm(tmp_path_factory.mktemp("trl") / "model")


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    return stack_cases.run_with_and_without_peft(model_dir, tmp_path_factory, CASES)


@pytest.mark.parametrize("mode", ["peft", "no_peft"])
@pytest.mark.parametrize("case", CASES)
def test_sft_trainer_trains_saves_and_loads(runs, model_dir, case, mode):
    stack_cases.check(model_dir, runs[mode] / case)


@pytest.mark.parametrize("case", CASES)
def test_same_adapter_with_and_without_peft(runs, case):
    stack_cases.assert_same_adapter(runs, case)


def _tiny_sft(model, model_dir, tmp_path, **kwargs):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = Dataset.from_dict({"prompt": ["hello"] * 2, "completion": [" hi"] * 2})
    return SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
                      train_dataset=rows, processing_class=AutoTokenizer.from_pretrained(model_dir), **kwargs)


def test_lora_on_lm_head_is_refused_as_trl_refuses_peft(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import lorakit

    model = lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                   lorakit.LoraConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="Applying a PEFT adapter to `lm_head` is not supported.*lorakit"):
        _tiny_sft(model, model_dir, tmp_path)


def test_lorakit_model_with_lorakit_peft_config_is_refused(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import lorakit

    model = lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lorakit.LoraConfig())
    with pytest.raises(ValueError, match="You passed a `PeftModel` instance together with a `peft_config`"):
        _tiny_sft(model, model_dir, tmp_path, peft_config=lorakit.LoraConfig())


def test_peft_config_from_peft_still_goes_to_peft(model_dir, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    trainer = _tiny_sft(AutoModelForCausalLM.from_pretrained(model_dir), model_dir, tmp_path,
                        peft_config=peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert isinstance(trainer.model, peft.PeftModel)
