"""Load a lorakit-trained adapter with real PEFT and with lorakit on the same base; compare outputs.

    python examples/peft_check.py out/lorakit-train/adapter [--model BASE_FOLDER]

Exit status 0 when both libraries give the same logits (max |difference| <= 1e-4), 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch


def quiet_third_parties() -> None:
    """Silence, by name, the noise this check would print that is about other libraries, not the adapter.

    - bitsandbytes (imported by peft) logs a warning at import on AVX512-BF16 CPUs when the optional
      ``kernels`` package is missing; its built-in CPU path is used instead, and nothing here runs 4-bit.
    - peft 0.21.2 reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates (FutureWarning).
    - transformers draws a "Loading weights" progress bar per model load.
    - torchao (imported by peft when installed) logs each optional CUDA kernel library it cannot load on a CPU
      machine, and torch's pytree logs a deprecation for the enums torchao registers.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--model", type=Path, help="base model folder (default: the embedded SmolLM2)")
    args = parser.parse_args()
    quiet_third_parties()
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorakit
    from lorakit.app.embedded import default_model_folder

    base_folder = args.model or default_model_folder()
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is a computer virus?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=False)
    logits = {}
    for library in (peft, lorakit):
        base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
        model = library.PeftModel.from_pretrained(base, args.adapter).eval()
        with torch.no_grad():
            logits[library.__name__] = model(input_ids=ids).logits
    difference = (logits["peft"] - logits["lorakit"]).abs().max().item()
    print(f"peft {peft.__version__} loaded {args.adapter}: max |peft - lorakit| logits = {difference:.2e}")
    return 0 if difference <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
