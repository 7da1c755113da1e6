"""lorakit models under transformers.Trainer and a transformers model's own adapter API, with peft installed and
in a child process where it is not (no_peft.py): default arguments (columns kept by the wrapped forward's
signature), bf16 with gradient checkpointing, ``add_adapter(lorakit.LoraConfig)``, ``save_model`` folders
that peft / lorakit / ``load_adapter`` / ``from_pretrained(adapter_dir)`` load to the trained logits, and
adapter-only checkpoints that resume exactly."""

from __future__ import annotations

import copy
import inspect

import pytest
import stack_cases
import torch
from safetensors.torch import load_file
from tiny_lm import save_tiny_llm
from transformers import AutoModelForCausalLM, TrainingArguments

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.app.hf_trainer import LoraTrainer

CASES = ["trainer_default", "trainer_bf16_checkpointing", "transformers_add_adapter"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llm(tmp_path_factory.mktemp("trainer") / "model")


def dataset():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(12, 50, (24, 12), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def trainer(model_dir, output, max_steps, route="get_peft_model"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False)
    if route == "get_peft_model":
        model = get_peft_model(model, config)
    else:  # transformers' own adapter API
        model.add_adapter(config)
    args = TrainingArguments(output_dir=str(output), max_steps=max_steps, per_device_train_batch_size=4,
                             save_steps=2, save_strategy="steps", report_to=[], use_cpu=True, seed=0,
                             data_seed=0, learning_rate=1e-2, logging_steps=1, dataloader_drop_last=True)
    return LoraTrainer(model=model, args=args, train_dataset=dataset())


@pytest.mark.parametrize("route", ["get_peft_model", "add_adapter"])
def test_adapter_only_checkpoints_and_exact_resume(model_dir, tmp_path, route):
    straight = trainer(model_dir, tmp_path / "straight", 4, route)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert "model.safetensors" not in files  # adapter-only: no copy of the frozen base
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert saved and all(".lora_" in key for key in saved)
    # the checkpoint is a PEFT adapter folder lorakit (and peft) load directly
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), checkpoint)

    resumed = trainer(model_dir, tmp_path / "resumed", 4, route)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final = {n: p.detach() for n, p in straight.model.named_parameters() if p.requires_grad}
    again = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert final.keys() == again.keys()
    for name in final:
        torch.testing.assert_close(again[name], final[name], atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    return stack_cases.run_with_and_without_peft(model_dir, tmp_path_factory, CASES)


@pytest.mark.parametrize("mode", ["peft", "no_peft"])
@pytest.mark.parametrize("case", CASES)
def test_trainer_trains_saves_and_loads(runs, model_dir, case, mode):
    stack_cases.check(model_dir, runs[mode] / case)


@pytest.mark.parametrize("case", CASES)
def test_same_adapter_with_and_without_peft(runs, case):
    stack_cases.assert_same_adapter(runs, case)


def test_add_adapter_and_trainer_give_the_same_training_as_get_peft_model(runs):
    """Same seed, same init: the two routes train the same numbers."""
    for mode in runs:
        wrapped, native = (load_file(runs[mode] / c / "adapter" / "adapter_model.safetensors")
                           for c in ("trainer_default", "transformers_add_adapter"))
        assert wrapped.keys() == native.keys()
        for key in wrapped:
            torch.testing.assert_close(native[key], wrapped[key], atol=1e-6, rtol=1e-6)


def test_forward_signature_is_the_wrapped_forward_plus_adapter_names(model_dir):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    wanted = list(inspect.signature(base.forward).parameters)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=2))
    parameters = inspect.signature(model.forward).parameters
    assert [p for p in parameters if p != "adapter_names"] == wanted
    assert parameters["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY
    twin = copy.deepcopy(model)  # the bound forward follows the copy
    assert twin.forward.__self__ is twin and list(inspect.signature(twin.forward).parameters) == list(parameters)
    ids = torch.tensor([[13, 20, 31]])
    torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_transformers_adapter_api_on_lorakit(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[13, 20, 31, 14]])
    plain = model(input_ids=ids).logits
    model.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]))
    model.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=["v_proj"]), adapter_name="other")
    assert model.active_adapters() == ["other"] and set(model.peft_config) == {"default", "other"}
    assert all(p.requires_grad == ("lora_" in n and ".other." in n) for n, p in model.named_parameters())
    with_other = model(input_ids=ids).logits
    model.disable_adapters()
    torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=0, rtol=0)
    model.enable_adapters()
    torch.testing.assert_close(model(input_ids=ids).logits, with_other, atol=0, rtol=0)
    state = model.get_adapter_state_dict("default")
    assert sorted(state) == [f"model.layers.{i}.self_attn.q_proj.lora_{m}.weight" for i in (0, 1) for m in "AB"]
    with pytest.raises(ValueError, match="Adapter with name other already exists"):
        model.add_adapter(LoraConfig(r=2), adapter_name="other")
    with pytest.raises(ValueError, match="following adapter.* not present and cannot be deleted: missing"):
        model.delete_adapter("missing")
    model.delete_adapter(["default", "other"])  # all of them: plain layers again, as with peft
    assert not model._hf_peft_config_loaded and not hasattr(model, "peft_config")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=0, rtol=0)


def test_peft_and_lorakit_adapters_do_not_mix_in_one_model(model_dir):
    import peft

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.add_adapter(peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already holds peft adapters"):
        model.add_adapter(LoraConfig(r=2), adapter_name="mine")
    lorakit_model = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit_model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="lorakit implements LoRA only"):
        lorakit_model.add_adapter(peft.LoraConfig(r=2), adapter_name="theirs")
    # a peft model and a lorakit model side by side in one process
    assert isinstance(model.model.layers[0].self_attn.q_proj, peft.tuners.lora.LoraLayer)
    assert isinstance(lorakit_model.model.layers[0].self_attn.q_proj, lorakit.LoraLayer)


IMPORT_ORDER = {
    "lorakit_first": "import lorakit, sys\n"
                     "assert not {'transformers', 'trl', 'accelerate', 'peft'} & set(sys.modules)\n"
                     "import transformers.trainer, trl.trainer.sft_trainer as sft\n"
                     "from transformers import AutoModelForCausalLM\n",
    "lorakit_last": "import transformers.trainer, trl.trainer.sft_trainer as sft\n"
                    "from transformers import AutoModelForCausalLM\nimport lorakit\n",
}
REGISTERED = """
import transformers.modeling_utils as modeling
from transformers.integrations.peft import PeftAdapterMixin
registered = [transformers.trainer._is_peft_model, transformers.Trainer._save,
              transformers.Trainer._load_from_checkpoint, modeling.maybe_load_adapters, PeftAdapterMixin.add_adapter,
              PeftAdapterMixin.load_adapter, AutoModelForCausalLM.from_pretrained, sft.add_fused_lm_head,
              sft.SFTTrainer.__init__]
missing = [f.__qualname__ for f in registered if not hasattr(f, "__lorakit_original__")]
assert not missing, missing
"""


@pytest.mark.parametrize("order", IMPORT_ORDER)
def test_registration_holds_in_either_import_order(order):
    """``import lorakit`` imports none of transformers / TRL / accelerate / peft; whichever comes first, every
    registration is in place (modules that copied a name before lorakit came are rebound too)."""
    import subprocess
    import sys

    from no_peft import ROOT

    result = subprocess.run([sys.executable, "-c", IMPORT_ORDER[order] + REGISTERED], capture_output=True, text=True,
                            timeout=300, check=False, env={**__import__("os").environ,
                                                           "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_load_adapter_from_a_state_dict_and_a_lorakit_config(model_dir):
    """transformers' ``load_adapter(peft_config=..., adapter_state_dict=...)``: a lorakit config, PEFT file keys."""
    torch.manual_seed(0)
    source = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                            LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([[13, 20, 31, 14]])
    expected = source.eval()(input_ids=ids).logits
    tensors = lorakit.get_peft_model_state_dict(source)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.load_adapter(peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_state_dict=tensors)
    assert not model.training and not any(p.requires_grad for p in model.parameters())  # is_trainable=False
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="Adapter with name default already exists"):
        model.load_adapter(peft_config=LoraConfig(r=2), adapter_state_dict=tensors)


def test_load_best_model_at_end_puts_the_best_checkpoints_adapter_back(model_dir, tmp_path):
    from transformers import Trainer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, save_steps=2,
                             eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, report_to=[],
                             use_cpu=True, learning_rate=1e-2, metric_for_best_model="loss",
                             greater_is_better=True)  # the loss falls: "best" is the earlier checkpoint, not the last
    rows = dataset()
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:8])
    trainer.train()
    best = load_file(f"{trainer.state.best_model_checkpoint}/adapter_model.safetensors")
    live = lorakit.get_peft_model_state_dict(model)
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2") and best.keys() == live.keys()
    for key in best:
        torch.testing.assert_close(live[key], best[key], atol=0, rtol=0)


@pytest.mark.parametrize("first", [True, False], ids=["first adapter", "second adapter"])
def test_load_adapter_state_dict_that_does_not_fit_is_refused_before_apply(model_dir, monkeypatch, first):
    """The state-dict load is plan, check, apply: a misfit fails at the check, so apply never runs (no add-then-
    delete rollback), and the model's modules and tensors are the ones it had."""
    import lorakit.tuner

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if not first:
        model.add_adapter(LoraConfig(r=2, target_modules=["k_proj"]), adapter_name="other")
    source = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    tensors = lorakit.get_peft_model_state_dict(source)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    applied: list[str] = []
    monkeypatch.setattr(lorakit.tuner, "apply", lambda *a, **k: applied.append("apply"))
    with pytest.raises(lorakit.AdapterLoadError, match="missing tensor"):
        model.load_adapter(peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_state_dict=tensors)
    assert applied == [] and dict(model.named_modules()) == modules
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    if first:
        assert not model._hf_peft_config_loaded
    else:
        assert list(model.peft_config) == ["other"]


def test_load_adapter_state_dict_draws_no_init(model_dir):
    """The factors come from the state dict, so the load plans with weights_follow: the global RNG is untouched."""
    source = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    tensors = lorakit.get_peft_model_state_dict(source)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(7)
    model.load_adapter(peft_config=LoraConfig(r=2, target_modules=["q_proj"]), adapter_state_dict=tensors)
    drawn = torch.rand(4)
    torch.manual_seed(7)
    torch.testing.assert_close(drawn, torch.rand(4), atol=0, rtol=0)


def test_post_import_hook_runs_once_after_the_module_and_survives_find_spec(tmp_path, monkeypatch):
    import importlib.util
    import sys

    from lorakit.integrations.hooks import replace, when_imported

    (tmp_path / "lorakit_hook_probe.py").write_text("def f(x):\n    return x + 1\n")
    (tmp_path / "lorakit_hook_user.py").write_text("from lorakit_hook_probe import f\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("lorakit_hook_probe", lambda module: seen.append(module.f(1)))
    when_imported("lorakit_hook_probe", lambda module: replace(module, "f", lambda original: lambda x: 2 * original(x)))
    assert importlib.util.find_spec("lorakit_hook_probe") is not None and seen == []  # looking is not importing
    import lorakit_hook_probe
    import lorakit_hook_user

    assert seen == [2] and lorakit_hook_user.f(1) == 4 and lorakit_hook_probe.f.__lorakit_original__(1) == 2
    assert lorakit_hook_probe.__loader__.__class__.__name__ == "SourceFileLoader"
    sys.modules.pop("lorakit_hook_probe")
    sys.modules.pop("lorakit_hook_user")
