"""The `lorakit` command's manners (issue 18, item 4; issue 14, item 5): usage, --help defaults,
`python -m lorakit`, the untrained "before" loss after a resume, a quiet PEFT check, "what next" and
`lorakit chat`, a base model name that resolves elsewhere, and plan against train's default recipe."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_lm import save_tiny_llm, write_chat_jsonl

import lorakit.app.cli.train as train_command
from lorakit.app.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_llm(root / "model"), write_chat_jsonl(root / "chat.jsonl")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A 3-step run (its stdout too) and its adapter folder."""
    model, data = tiny
    output = tmp_path_factory.mktemp("run")
    stdout = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(stdout):
        status = main(["train", "--model", str(model), "--data", str(data), "--output", str(output), "--r", "4",
                       "--batch-size", "4", "--max-steps", "3", "--samples", "0", "--time-limit", "0"])
    assert status == 0
    return output, stdout.getvalue()


def test_bare_lorakit_prints_usage_and_trains_nothing(capsys, monkeypatch):
    monkeypatch.setattr(train_command, "run", lambda args: pytest.fail("bare lorakit started training"))
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lorakit") and "{train,chat,plan,inspect,merge,export}" in out
    assert "lorakit train --help" in out


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", list(_commands()))
def test_help_shows_every_default(command):
    """Every optional option's help line names its default, and never as a bare "None" (required options
    have none: the usage line marks them)."""
    parser = _commands()[command]
    formatter = parser.formatter_class(prog=parser.prog)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.required:
            continue
        text = formatter._get_help_string(action) % {"default": action.default}
        assert "default" in text and "(default: None)" not in text, (command, action.option_strings, text)
    assert "(default: 80)" in _commands()["train"].format_help()


def test_python_m_lorakit_is_the_lorakit_command(capsys):
    assert main([]) == 0
    expected = capsys.readouterr().out
    done = subprocess.run([sys.executable, "-m", "lorakit"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])})
    assert done.returncode == 0 and done.stdout == expected, done.stderr
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", "--max-steps", "0"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 2 and done.stderr.strip() == "lorakit train: error: --max-steps must be at least 1, got 0"


def test_after_a_resume_the_before_loss_is_the_untrained_models(tiny, tmp_path, capsys):
    model, data = tiny
    base = ["train", "--model", str(model), "--data", str(data), "--r", "4", "--batch-size", "4", "--samples", "1",
            "--time-limit", "0"]
    assert main([*base, "--output", str(tmp_path / "a"), "--max-steps", "2"]) == 0
    first = capsys.readouterr().out
    assert main(["train", "--output", str(tmp_path / "a"), "--resume", "--max-steps", "4", "--samples", "1",
                 "--time-limit", "0"]) == 0
    second = capsys.readouterr().out
    metrics = [json.loads((tmp_path / "a" / "metrics.json").read_text())]
    before = [line for line in first.splitlines() if line.startswith("held-out loss before")][0]
    assert before in second and "the untrained model's, recorded in the checkpoint" in second
    answer = [line for line in first.splitlines() if "[before] A:" in line]
    assert answer and answer[0] in second  # the untrained model's sample answer, not the resumed one's
    assert metrics[0]["held_out_loss_before"] == pytest.approx(float(before.split(": ")[1].split()[0]), abs=1e-4)


def test_peft_check_prints_no_third_party_noise(trained, tiny):
    output, _ = trained
    model, _ = tiny
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "peft_check.py"), str(output / "adapter"),
                           "--model", str(model)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout.startswith("peft ") and len(done.stdout.splitlines()) == 1, done


def test_training_ends_with_what_next_and_the_snippet_loads_the_adapter(trained):
    output, stdout = trained
    tail = stdout[stdout.index("what next"):].splitlines()
    snippet = "\n".join(line.strip() for line in tail[1:4])
    assert tail[4] == f"or talk to it: lorakit chat {output / 'adapter'} --prompt \"What is a computer virus?\""
    scope: dict = {}
    exec(snippet, scope)  # the three printed lines, as a user would paste them
    import lorakit

    assert isinstance(scope["model"], lorakit.PeftModel) and scope["model"].peft_config["default"].r == 4


def test_chat_answers_one_prompt_and_stdin_lines(trained, tiny, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorakit
    from lorakit.app.training import sample_answers

    output, _ = trained
    model, _ = tiny
    base = AutoModelForCausalLM.from_pretrained(model)
    reference = lorakit.PeftModel.from_pretrained(base, output / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = ["hello how are you ?", "what is python ?"]
    expected = sample_answers(reference, tokenizer, prompts, max_new_tokens=6)
    assert main(["chat", str(output / "adapter"), "--prompt", prompts[0], "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(prompts) + "\n"))
    assert main(["chat", str(output / "adapter"), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == "".join(answer + "\n" for answer in expected)
    assert main(["chat", str(output), "--prompt", "hi"]) == 2  # not an adapter folder: one line
    err = capsys.readouterr().err.strip()
    assert "no readable adapter_config.json" in err and len(err.splitlines()) == 1


def test_embedded_base_is_named_by_its_hub_id(tiny, tmp_path, monkeypatch, capsys):
    """Trained on the embedded model (a tiny model stands in, in a folder of the embedded one's name), the
    adapter names the hub id; chat maps that id back to the local folder and loads with no base warning."""
    import warnings

    import lorakit.app.embedded as embedded
    from lorakit.errors import LoraWarning

    _, data = tiny
    model = save_tiny_llm(tmp_path / "cache" / embedded.SMOLLM2_NAME)
    monkeypatch.setattr(embedded, "default_model_folder", lambda verbose=True: model)
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "out"), "--r", "4", "--batch-size", "4",
                 "--max-steps", "1", "--samples", "0", "--time-limit", "0"]) == 0
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" == embedded.SMOLLM2_HUB_ID
    assert embedded.resolve_base(embedded.SMOLLM2_HUB_ID) == str(model)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraWarning)
        assert main(["chat", str(tmp_path / "out" / "adapter"), "--prompt", "hello", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("examples, only_dropout", [(2361, False), (200_000, True)])
def test_plan_says_how_it_differs_from_trains_default_recipe(tiny, capsys, examples, only_dropout):
    model, _ = tiny
    assert main(["plan", "--model", str(model), "--examples", str(examples), "--task", "causal-lm"]) == 0
    out = capsys.readouterr().out
    if only_dropout:  # 200,000 examples: r=64, dropout 0: the plan differs only in dropout
        assert "lorakit train's default recipe" in out and "lora_dropout=0.0 here, 0.1 there" in out
        assert "r=64 here" not in out
    else:
        assert "r=16 here, 64 there" in out and "one fixed recipe" in out and "Train it:" in out

