"""``lorakit export ADAPTER --for vllm|llama.cpp|peft --out DIR``: an adapter every LoRA reader scales alike.

Serving engines read only ``r`` and ``lora_alpha``. vLLM before 0.32 computes one ``s`` (``α/r``, or ``α/√r``
with rsLoRA) for the whole adapter and ignores ``rank_pattern`` / ``alpha_pattern`` (0.32 reads both);
llama.cpp's converter keeps only ``lora_alpha`` and divides it by each tensor's own rank, which is wrong for
rsLoRA (``s = α/√r``) and for rank or alpha patterns. Export therefore moves every layer's true scaling into
its factors:

    B' = [s_l · B, 0]  (out, R)     A' = [A; 0]  (R, in)     bias' = s_l · bias     R = max_l r_l

and writes ``r = lora_alpha = R``, ``use_rslora = false`` and no patterns. Every reader then finds
``s = R / R = 1`` for every layer (vLLM's global r, llama.cpp's per-tensor rank R, PEFT and lorakit), and
``s·B'A' = s_l·B A``: outputs are unchanged. Zero-padding to the common rank R is what makes llama.cpp's
per-tensor ``alpha / rank`` equal 1 too; the padded rows and columns add nothing to the product. DoRA's
magnitude is unaffected (``W + 1·B'A' = W + s_l·B A``, so its norm is the same) and is copied as is.

``--for llama.cpp --out FILE.gguf`` writes these factors as llama.cpp's GGUF LoRA (``export_gguf``).
What an engine cannot load is refused with a one-line reason (the ``ENGINES`` table); residual inits
(PiSSA, OLoRA, LoftQ, CorDA) are refused for every target, because their factors only make sense against
a rewritten base weight and converting them needs ``path_initial_model_for_weight_conversion``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ...atomic import replace_folder
from ...codec import PREFIX, parse_key
from ...config import LoraConfig
from ...inits import INITS
from ...io import BIN_NAME, CONFIG_NAME, PEFT_VERSION_TAG, SAFETENSORS_NAME, read_config, read_weights
from ...targeting import layer_spec
from ...targeting import task_modules_to_save
from .adapter_layers import LayerFactors, layers_of
from .common import CliError, Command, register
from .export_gguf import export_gguf

# ---- what each engine cannot load ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    applies: Callable[[LoraConfig, dict[str, Tensor]], bool]
    reason: str  # formatted with the config's fields


def _init_name(config: LoraConfig, tensors: dict[str, Tensor]) -> bool:
    return INITS[config.init_method.name].residual  # the adapter needs the rewritten base W_res


def _has_conv(config: LoraConfig, tensors: dict[str, Tensor]) -> bool:
    return any(layer.A and tensors[layer.A].dim() > 2 for layer in layers_of(tensors).values())


REFUSALS: dict[str, Refusal] = {
    "residual_init": Refusal(_init_name, "init_lora_weights={init_lora_weights!r} stores factors relative to a "
                             "rewritten base weight W' = W - s*B*A; convert it to plain LoRA first with "
                             "peft_model.save_pretrained(dir, path_initial_model_for_weight_conversion=init_dir) "
                             "and export that folder"),
    "bdlora": Refusal(lambda c, t: c.use_bdlora is not None,
                      "use_bdlora stores block-diagonal factors compactly, which the engine cannot read"),
    "dora": Refusal(lambda c, t: c.use_dora, "use_dora=true (DoRA's magnitude vector) is not supported by the engine"),
    "modules_to_save": Refusal(lambda c, t: bool(task_modules_to_save(c)),
                               "modules_to_save (fully trained modules, here {saved}) cannot be loaded by the engine"),
    "lora_bias": Refusal(lambda c, t: c.lora_bias, "lora_bias=true (a bias in lora_B) is not supported by the engine"),
    "base_bias": Refusal(lambda c, t: c.bias != "none",
                         "bias={bias!r} saves trained base-layer biases, which the engine cannot load"),
    "conv": Refusal(_has_conv, "the adapter targets convolution layers, which the engine does not adapt"),
}


@dataclass(frozen=True)
class Engine:
    refuse: tuple[str, ...]  # keys of REFUSALS
    drop_base_copies: bool  # drop the base embedding weights PEFT saves next to embed_tokens/lm_head LoRA
    note: str = ""


ENGINES: dict[str, Engine] = {
    # vLLM's PEFTHelper rejects modules_to_save and DoRA; its loader reads only LoRA factor tensors.
    "vllm": Engine(("residual_init", "bdlora", "dora", "modules_to_save", "lora_bias", "base_bias", "conv"), True,
                   "vLLM 0.32 and later read rsLoRA, rank_pattern and alpha_pattern themselves and serve the raw "
                   "adapter with the same outputs; vLLM before 0.32 (checked: 0.8.5, 0.28, 0.31) reads use_rslora "
                   "but ignores rank_pattern / alpha_pattern (one scaling for every layer), so an adapter with "
                   "patterns needs this export there. For 0.32 the export changes no output: it pads every rank to "
                   "{r}, drops the saved base embedding copies (which vLLM skips) and refuses up front what vLLM "
                   "refuses at load. Start vLLM with "
                   "--max-lora-rank of at least {r} (LoRA on embed_tokens / lm_head also needs a model class that "
                   "declares embedding-LoRA support)"),
    # llama.cpp's convert_lora_to_gguf.py exits on any tensor but lora_A/lora_B/lora_embedding_* (and norms).
    "llama.cpp": Engine(("residual_init", "bdlora", "dora", "modules_to_save", "lora_bias", "base_bias", "conv"),
                        True, "convert with: python convert_lora_to_gguf.py --base BASE_FOLDER {out}, or let "
                        "lorakit write the same GGUF: lorakit export ADAPTER --for llama.cpp --out FILE.gguf"),
    "peft": Engine(("residual_init",), False),
}


def refusals(engine: str, config: LoraConfig, tensors: dict[str, Tensor]) -> list[str]:
    """Every reason ``engine`` cannot load this adapter (empty: it can)."""
    fields = {**config.to_dict(), "saved": task_modules_to_save(config)}
    return [REFUSALS[name].reason.format(**fields) for name in ENGINES[engine].refuse
            if REFUSALS[name].applies(config, tensors)]


# ---- the scaling normalisation -----------------------------------------------------------------------------
def layer_scalings(config: LoraConfig, layers: dict[str, LayerFactors],
                   tensors: dict[str, Tensor]) -> dict[str, tuple[int, float]]:
    """Module path -> (r_l, s_l) as PEFT computes them; the rank in the file must agree with the config.

    Raises:
        CliError: a layer lacks A or B, or its rank differs from the one r / rank_pattern give it.
    """
    problems, result = [], {}
    for path, layer in layers.items():
        if layer.A is None or layer.B is None:
            problems.append(f"{path} has {'no A' if layer.A is None else 'no B'} factor")
            continue
        spec = layer_spec(path, config)
        rank = tensors[layer.A].shape[0]
        if rank != spec.r:
            problems.append(f"{path} holds rank {rank} but the config (r / rank_pattern) gives {spec.r}")
        result[path] = (rank, spec.scaling)
    if problems:
        raise CliError(f"the adapter's weights do not match its config: {'; '.join(problems[:5])}")
    return result


def _pad(tensor: Tensor, dim: int, size: int) -> Tensor:
    shape = list(tensor.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def fold_layer(tensors: dict[str, Tensor], layer: LayerFactors, rank: int, scaling: float, R: int) -> dict[str, Tensor]:
    """A' = [A; 0], B' = [s·B, 0], bias' = s·bias (scaled in float64, stored in the file's dtype)."""
    assert layer.A is not None and layer.B is not None  # layers missing a factor were refused before folding
    A, B = tensors[layer.A], tensors[layer.B]
    if rank < R and B.shape[1] != rank:  # grouped conv B: (out, r/groups, 1, ...) cannot be padded column-wise
        raise CliError(f"cannot pad {layer.B} (shape {tuple(B.shape)}) from rank {rank} to {R}")
    out = {layer.A: _pad(A, 0, R).contiguous(),
           layer.B: _pad((B.double() * scaling).to(B.dtype), 1, R).contiguous()}
    if layer.bias is not None:
        out[layer.bias] = (tensors[layer.bias].double() * scaling).to(tensors[layer.bias].dtype).contiguous()
    return out


def normalise(config: LoraConfig, tensors: dict[str, Tensor], drop_base_copies: bool) -> tuple[LoraConfig, dict]:
    """The adapter with every layer's scaling folded into B and every rank padded to R; config r = alpha = R."""
    layers = layers_of(tensors)
    scalings = layer_scalings(config, layers, tensors)
    R = max(rank for rank, _ in scalings.values())
    out = {key: tensor.contiguous() for key, tensor in tensors.items()
           if not (drop_base_copies and key.endswith(".base_layer.weight"))}
    for path, (rank, scaling) in scalings.items():
        out.update(fold_layer(tensors, layers[path], rank, scaling, R))
    new_config = dataclasses.replace(config, r=R, lora_alpha=R, use_rslora=False, rank_pattern={}, alpha_pattern={})
    return new_config, out


# ---- the command ---------------------------------------------------------------------------------------------
def config_text(config: LoraConfig) -> str:
    """adapter_config.json as PEFT writes it (auto_mapping kept from the original file)."""
    data = config.to_dict()
    data.update(inference_mode=True, peft_version=PEFT_VERSION_TAG)
    return json.dumps(data, indent=2, sort_keys=True)


def write_adapter(out: Path, config: LoraConfig, tensors: dict[str, Tensor]) -> None:
    def write(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(config_text(config), encoding="utf-8")
        save_file(tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})

    replace_folder(out, write, owned=(CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", type=Path, metavar="ADAPTER", help="adapter folder (PEFT's or lorakit's)")
    parser.add_argument("--for", dest="engine", choices=list(ENGINES), required=True,
                        help="the reader: vllm, llama.cpp (convert_lora_to_gguf.py) or peft")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the exported PEFT-format adapter, or FILE.gguf (--for llama.cpp): the GGUF "
                             "LoRA llama.cpp loads with --lora")
    parser.add_argument("--base", type=Path, help="GGUF only: the base model folder (its config.json names the "
                        "architecture); default: the adapter's base_model_name_or_path")
    parser.add_argument("--arch", help="GGUF only: llama.cpp's architecture name (llama, qwen2, qwen3) when no base "
                        "config.json is at hand; default: read from the base model's config.json")


def run(args: argparse.Namespace) -> int:
    if not args.adapter.is_dir():
        raise CliError(f"adapter folder {args.adapter} does not exist")
    if args.out.resolve() == args.adapter.resolve():
        raise CliError(f"--out {args.out} is the adapter folder itself; export to a new folder")
    gguf_out = args.out.suffix.lower() == ".gguf"
    if (gguf_out and args.engine != "llama.cpp") or (not gguf_out and (args.base or args.arch)):
        raise CliError(f"--out {args.out}{' with --base/--arch' if args.base or args.arch else ''} does not fit "
                       f"--for {args.engine}: a GGUF file (--out FILE.gguf, with --base or --arch) is written for "
                       "--for llama.cpp only; other exports write a folder")
    config, tensors = read_config(args.adapter), read_weights(args.adapter)
    reasons = refusals(args.engine, config, tensors)
    if reasons:
        raise CliError(f"{args.engine} cannot load {args.adapter}: {'; '.join(reasons)}")
    engine = ENGINES[args.engine]
    new_config, new_tensors = normalise(config, tensors, engine.drop_base_copies)
    if gguf_out:
        kind = export_gguf(args.out, args.adapter, new_config, new_tensors, args.base, args.arch)
    else:
        write_adapter(args.out, new_config, new_tensors)
        kind = "PEFT format"
    dropped = len(tensors) - len(new_tensors)
    print(f"exported {args.adapter} for {args.engine} -> {args.out} ({kind}): r = lora_alpha = {new_config.r} "
          f"(every layer's scaling folded into lora_B, ranks zero-padded to {new_config.r})")
    if dropped:
        print(f"dropped {dropped} saved base embedding weight(s): the engine takes them from the base model "
              "(a resized vocabulary needs the resized base model)")
    if engine.note and not gguf_out:
        print("note: " + engine.note.format(r=new_config.r, out=args.out))
    return 0


register("export", Command("normalise an adapter for vLLM, llama.cpp or PEFT readers", add_arguments, run))
