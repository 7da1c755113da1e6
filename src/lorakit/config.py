"""LoraConfig with PEFT's field names and defaults, its validation, and its JSON form.

A config is checked once, here, at construction: every invalid value or combination raises a
``ValueError`` that names the field. Strings with structure are parsed once at this boundary
(``"pissa_niter_16"`` -> ``InitMethod("pissa", {"niter": 16})``); layers never see a LoraConfig.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from .errors import explain, unknown_argument, warn
from .init_registry import named_inits

if TYPE_CHECKING:
    from .variants.velora import VeloraConfig

PEFT_VERSION_WRITTEN = "0.21.2"  # the PEFT release whose file format lorakit writes


class TaskType(str, enum.Enum):
    """PEFT's task types; they pick the PeftModel class and add classifier heads to modules_to_save."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """The one PEFT method lorakit implements."""

    LORA = "LORA"


def strict_init(cls: type) -> type:
    """Make a dataclass reject misspelt keyword arguments with a 'did you mean' hint."""
    original: Callable[..., None] = cls.__init__  # type: ignore[misc]  # the dataclass's own __init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for name in kwargs:
            if name not in names:
                raise unknown_argument(cls.__name__, name, names)
        original(self, *args, **kwargs)

    __init__.__doc__ = original.__doc__
    cls.__init__ = __init__  # type: ignore[misc]  # replaced on the class itself, same signature
    return cls


@strict_init
@dataclass
class LoftQConfig:
    """LoftQ (arXiv:2310.08659): alternate ``loftq_bits`` quantisation and rank-r SVD ``loftq_iter`` times."""

    loftq_bits: int = 4
    loftq_iter: int = 1


@strict_init
@dataclass
class EvaConfig:
    """EVA (arXiv:2410.07170): data-driven init from the SVD of layer inputs."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True


@strict_init
@dataclass
class CordaConfig:
    """CorDA (arXiv:2406.05223): covariance-oriented SVD init, ``corda_method`` "ipm" or "kpm"."""

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: Literal["ipm", "kpm"] = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True


@strict_init
@dataclass
class BdLoraConfig:
    """Block-diagonal LoRA: ``nblocks`` blocks in A (``target_modules_bd_a``) or B (``target_modules_bd_b``)."""

    target_modules_bd_a: list[str] | None = None
    target_modules_bd_b: list[str] | None = None
    nblocks: int = 1
    match_strict: bool = True


@strict_init
@dataclass
class LoraRuntimeConfig:
    """Settings that are not saved with the adapter (PEFT keeps them out of adapter_config.json).

    ``ephemeral_gpu_offload``: in peft 0.21.2 it acts only on DoRA's initialization (the weight norm of CPU-held
    factors is computed on a GPU and brought back). Without DoRA it changes nothing, in lorakit too; with DoRA
    lorakit refuses it by name (``LoraConfig.not_yet_supported``).
    """

    ephemeral_gpu_offload: bool = False


@dataclass(frozen=True)
class InitMethod:
    """``init_lora_weights`` parsed once: a registry key of ``inits.INITS`` and its options."""

    name: str  # "default" (True), "none" (False), "gaussian", "pissa", "olora", ...
    options: dict[str, Any] = field(default_factory=dict)


_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def parse_init(value: bool | str) -> InitMethod:
    """``init_lora_weights`` -> InitMethod.

    Raises:
        ValueError: the value is not True, False, a named init (``init_registry.Init.named``) or
            ``pissa_niter_<N>`` with N >= 1.
    """
    if value is True:
        return InitMethod("default")
    if value is False:
        return InitMethod("none")
    if isinstance(value, str):
        lowered = value.lower()
        if lowered in named_inits():
            return InitMethod(lowered)
        match = _PISSA_NITER.fullmatch(lowered)
        if match and int(match.group(1)) >= 1:
            return InitMethod("pissa", {"niter": int(match.group(1))})
    raise ValueError(
        explain(
            "invalid init_lora_weights",
            where="LoraConfig",
            got=value,
            expected=f"True, False, one of {named_inits()} or 'pissa_niter_<N>' with N >= 1",
        )
    )


@dataclass(frozen=True)
class Subconfig:
    """How ``LoraConfig.<field>`` holds a sub-config dataclass that lives with its feature (a variant's file,
    loraga.py). ``from_dict``: dict (as read from adapter_config.json) -> ``cls``; None: ``cls`` built from the
    keys it takes, the others dropped with one warning (a file from a newer PEFT)."""

    cls: type
    from_dict: Callable[[dict[str, Any]], Any] | None = None


# LoraConfig field -> its Subconfig; each feature registers its own (register_subconfig), this module imports none.
SUBCONFIGS: dict[str, Subconfig] = {}


def register_subconfig(field_name: str, cls: type, from_dict: Callable[[dict[str, Any]], Any] | None = None) -> type:
    """Make ``LoraConfig.<field_name>`` hold a ``cls`` (a dict there is converted, as PEFT's loading does)."""
    SUBCONFIGS[field_name] = Subconfig(cls, from_dict)
    return cls


def _subconfig(field_name: str, value: Any, sub: Subconfig) -> Any:
    """``value`` as ``sub.cls``: None and a ``cls`` as they are, a dict converted.

    Raises:
        TypeError: ``value`` is neither None, a ``cls`` nor a dict (PEFT's sentence first).
    """
    cls = sub.cls
    if value is None or isinstance(value, cls):
        return value
    name = cls.__name__
    if not isinstance(value, dict):
        raise TypeError(f"`{name}` must be a `{name}`, a dict, or None. "
                        + explain(f"invalid {field_name}", where="LoraConfig", got=type(value).__name__,
                                  expected=f"{name}(...), a dict of its fields, or None"))
    if sub.from_dict is not None:
        return sub.from_dict(value)
    return cls(**_known_keys(value, cls, f"LoraConfig.{field_name}", name))


def _known_keys(data: dict[str, Any], cls: type, where: str, reader: str) -> dict[str, Any]:
    """``data`` without the keys ``cls`` does not take, which are dropped with one warning naming them."""
    accepted = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - accepted)
    if unknown:
        warn(f"{where}: ignoring keys {reader} does not know: {unknown}")
    return {k: v for k, v in data.items() if k in accepted}


def _strictly(cls: type) -> Callable[[dict[str, Any]], Any]:
    """A dict converted to ``cls`` strictly: a misspelt key raises (``strict_init``, with a hint)."""
    return lambda data: cls(**data)


# This module's own sub-configs: a dict is converted strictly.
for _field, _cls in (("eva_config", EvaConfig), ("corda_config", CordaConfig), ("use_bdlora", BdLoraConfig),
                     ("runtime_config", LoraRuntimeConfig)):
    register_subconfig(_field, _cls, _strictly(_cls))


# Options PEFT has that lorakit accepts and stores but does not run yet, with the value that means "off".
# get_peft_model raises NotImplementedError naming any of them that is set (never a silent no-op).
NOT_YET = {
    "megatron_config": (None, "Megatron parallel layers are not supported"),
}


@strict_init
@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter; PEFT's ``LoraConfig`` field for field (peft 0.21.2).

    The adapted layer computes ``y = W x + b + s · B A dropout(x)`` with ``A: (r, in)``, ``B: (out, r)`` and
    ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``, arXiv:2312.03732).

    Fields:
        r: rank of the update. lora_alpha: numerator of the scaling. lora_dropout: dropout on the LoRA
        branch input only. target_modules: list (exact name or dot-bounded suffix), regex string (full match),
        "all-linear", or None for the architecture's default. exclude_modules: like target_modules, wins.
        fan_in_fan_out: the base weight is stored (in, out) (GPT-2 Conv1D). bias: "none", "all" or
        "lora_only" (which biases train). use_rslora: s = alpha/sqrt(r). modules_to_save: modules trained
        in full and saved with the adapter. init_lora_weights: True, False, "gaussian", "orthogonal", "pissa",
        "pissa_niter_N", "olora", "loftq", "eva", "corda". layers_to_transform / layers_pattern: restrict to
        layer indices. rank_pattern / alpha_pattern: per-module r / alpha, keys are regexes matched against
        the end of the module name. use_dora: weight-decomposed LoRA. lora_bias: a trainable bias in lora_B.
        use_bdlora: block-diagonal LoRA. velora_config: VeLoRA (variants/velora.py), a VeloraConfig or its
        dict. task_type: picks the PeftModel class.

    Raises:
        ValueError: an invalid value or combination, naming the field (also for a misspelt argument).
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = PeftType.LORA
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = PEFT_VERSION_WRITTEN
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, Any] | None = field(default_factory=dict)
    alpha_pattern: dict[str, Any] | None = field(default_factory=dict)
    megatron_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: LoftQConfig | dict[str, Any] = field(default_factory=dict)
    eva_config: EvaConfig | None = None
    corda_config: CordaConfig | None = None
    lora_ga_config: Any = None  # a loraga.LoraGAConfig (or its dict)
    use_dora: bool = False
    velora_config: VeloraConfig | dict[str, Any] | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None  # variants/monteclora.py's MontecloraConfig
    layer_replication: list[tuple[int, int]] | None = None
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig)
    lora_bias: bool = False
    target_parameters: list[str] | set[str] | None = None
    use_bdlora: BdLoraConfig | dict[str, Any] | None = None
    arrow_config: Any = None  # a variants.arrow.ArrowConfig (or its dict)
    kasa_config: Any = None  # variants/kasa.py's KasaConfig
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        # PEFT stores list targets as sets (order carries no meaning); keep that so `in` and equality agree.
        for name in ("target_modules", "exclude_modules", "target_parameters"):
            if isinstance(getattr(self, name), (list, tuple)):
                setattr(self, name, set(getattr(self, name)))
        if self.target_parameters is not None and not isinstance(self.target_parameters, (list, tuple, set)):
            raise TypeError("`target_parameters` must be a list of strings or None. "
                            + explain("target_parameters has the wrong type", got=type(self.target_parameters).__name__,
                                      expected="a list of parameter names (exact or dot-bounded suffixes)",
                                      fix="wrap the name in a list: target_parameters=['mlp.experts.gate_up_proj']"))
        for name, sub in SUBCONFIGS.items():  # eva_config, use_bdlora, velora_config, ... given as dicts
            setattr(self, name, _subconfig(name, getattr(self, name), sub))
        for name in ("rank_pattern", "alpha_pattern"):  # None (PEFT allows it) is no pattern
            if getattr(self, name) is None:
                setattr(self, name, {})
        for check in VALIDATORS:
            check(self)
        if self.init_method.name == "eva" and self.eva_config is None:
            self.eva_config = EvaConfig()
        if self.init_method.name == "corda" and self.corda_config is None:
            self.corda_config = CordaConfig()

    @property
    def init_method(self) -> InitMethod:
        """``init_lora_weights`` parsed (see ``parse_init``); "loftq" carries {"bits", "iters"} of loftq_config."""
        method = parse_init(self.init_lora_weights)
        if method.name == "loftq" and self.loftq_config:
            loftq = _as_dict(self.loftq_config)
            return InitMethod("loftq", {"bits": loftq.get("loftq_bits", 4), "iters": loftq.get("loftq_iter", 1)})
        if method.name == "lora_ga":  # the LoraGAConfig's fields (None: none given, refused where a gradient is used)
            return InitMethod("lora_ga", {"lora_ga_config": _as_dict(self.lora_ga_config)
                                          if self.lora_ga_config is not None else None})
        return method

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def not_yet_supported(self) -> list[str]:
        """Fields set to a value lorakit stores but cannot run yet, each with the reason."""
        found = [
            f"{name}={getattr(self, name)!r} ({reason})"
            for name, (off, reason) in NOT_YET.items()
            if getattr(self, name) not in (off, {}, [])
        ]
        if self.use_dora and self.runtime_config.ephemeral_gpu_offload:
            found.append("runtime_config.ephemeral_gpu_offload=True with use_dora=True (it only moves DoRA's "
                         "weight-norm computation to a GPU and back, as in PEFT; lorakit computes it where the "
                         "weights are: set it to False, the result is the same)")
        return found

    # ---- files ---------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``<save_directory>/adapter_config.json`` (atomically), as PEFT's ``PeftConfig`` does."""
        from .atomic import write_file_atomically  # keeps config importable without the I/O modules

        write_file_atomically(os.path.join(save_directory, "adapter_config.json"), self.to_json_string().encode())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None,
                        **kwargs: Any) -> LoraConfig:
        """Read ``adapter_config.json`` from a local folder (there is no hub access)."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        path = os.path.join(folder, "adapter_config.json")
        if not os.path.isfile(path):
            raise ValueError(explain("no adapter_config.json", where=folder, fix="pass a local adapter folder"))
        with open(path, encoding="utf-8") as handle:
            return cls.from_json_string(handle.read(), source=path)

    # ---- JSON form -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content: every field but ``runtime_config``, JSON-ready (41 keys)."""
        return {f.name: _jsonable(getattr(self, f.name))
                for f in dataclasses.fields(self) if f.name != "runtime_config"}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> LoraConfig:
        """Build a config from a dict written by any PEFT version.

        Unknown keys are dropped with one LoraWarning naming them; ``peft_type`` must be LORA when present.

        Raises:
            ValueError: a non-LoRA config, or an invalid value (naming the field).
        """
        data = dict(data)
        peft_type = data.get("peft_type", "LORA")
        if str(getattr(peft_type, "value", peft_type)).upper() != "LORA":
            raise ValueError(
                explain("not a LoRA config", where=source, got=peft_type, expected="peft_type 'LORA'",
                        fix="lorakit implements LoRA only; load this adapter with the library that made it")
            )
        kwargs = _known_keys(data, cls, source, "lorakit")
        if isinstance(kwargs.get("loftq_config"), dict) and kwargs["loftq_config"]:
            kwargs["loftq_config"] = LoftQConfig(**kwargs["loftq_config"])
        return cls(**kwargs)

    @classmethod
    def from_json_string(cls, text: str, *, source: str = "config") -> LoraConfig:
        return cls.from_dict(json.loads(text), source=source)


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ---- validation: one small function per rule, run in order by __post_init__ -------------------------------
def _as_dict(value: LoftQConfig | dict[str, Any]) -> dict[str, Any]:
    """loftq_config / lora_ga_config as a dict: PEFT stores a dict, lorakit accepts the dataclass too."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)


def _fail(field_name: str, got: object, expected: str, fix: str = "") -> ValueError:
    return ValueError(explain(f"invalid {field_name}", where="LoraConfig", got=got, expected=expected, fix=fix))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_types(config: LoraConfig) -> None:
    if config.peft_type is not None and str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise _fail("peft_type", config.peft_type, "'LORA'", "lorakit implements LoRA only")
    task = getattr(config.task_type, "value", config.task_type)
    if task is not None and (not isinstance(task, str) or task not in {t.value for t in TaskType}):
        raise _fail("task_type", config.task_type, f"None or one of {[t.value for t in TaskType]}")
    for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode"):
        if not isinstance(getattr(config, name), bool):
            raise _fail(name, getattr(config, name), "True or False")


def _check_numbers(config: LoraConfig) -> None:
    if not _is_int(config.r) or config.r <= 0:
        raise _fail("r", config.r, "a positive integer (the LoRA rank)", "use e.g. r=8")
    if not _is_number(config.lora_alpha) or config.lora_alpha <= 0:
        raise _fail("lora_alpha", config.lora_alpha, "a positive finite number (the scaling numerator)",
                    "alpha <= 0 silences or flips the adapter; use e.g. lora_alpha=2*r")
    if not _is_number(config.lora_dropout) or not 0.0 <= config.lora_dropout < 1.0:
        raise _fail("lora_dropout", config.lora_dropout, "a probability in [0, 1)")
    if config.bias not in ("none", "all", "lora_only"):
        raise _fail("bias", config.bias, "'none', 'all' or 'lora_only'")
    parse_init(config.init_lora_weights)


def _check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise _fail(field_name, pattern, f"a valid regular expression ({error})") from None


def _check_names(value: object, field_name: str) -> None:
    if value is None:
        return
    if isinstance(value, str):
        _check_regex(field_name, value)
        return
    if not isinstance(value, (set, frozenset)) or not all(isinstance(v, str) for v in value):
        raise _fail(field_name, value, "None, a regex string or a list of module names")


def _check_targets(config: LoraConfig) -> None:
    _check_names(config.target_modules, "target_modules")
    _check_names(config.exclude_modules, "exclude_modules")
    if isinstance(config.target_modules, (set, frozenset)) and not config.target_modules \
            and not config.target_parameters:  # [] next to target_parameters: parameters only (PEFT)
        raise _fail("target_modules", [], "at least one module name", "or pass None for the architecture default")
    if config.modules_to_save is not None and (
        not isinstance(config.modules_to_save, (list, tuple, set, frozenset))
        or not all(isinstance(v, str) for v in config.modules_to_save)
    ):
        raise _fail("modules_to_save", config.modules_to_save, "a list of module names, e.g. ['classifier']")


def _check_layers(config: LoraConfig) -> None:
    layers = config.layers_to_transform
    if layers is not None:
        indices: Any = [layers] if _is_int(layers) else layers
        if not isinstance(indices, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in indices):
            raise _fail("layers_to_transform", layers, "a non-negative int or a list of them")
        if isinstance(config.target_modules, str):
            raise _fail("layers_to_transform", layers, "target_modules as a list when layers are selected",
                        "a regex target_modules already decides layers; encode the indices in the regex")
    if config.layers_pattern is not None:
        if layers is None:
            raise _fail("layers_pattern", config.layers_pattern, "layers_to_transform to be set as well",
                        "set layers_to_transform or drop layers_pattern")
        patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
            raise _fail("layers_pattern", config.layers_pattern, "a module-list name such as 'layers' or a list")


def _check_patterns(config: LoraConfig) -> None:
    checks: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
        ("rank_pattern", lambda v: _is_int(v) and v > 0, "positive int ranks"),
        ("alpha_pattern", lambda v: _is_number(v) and v > 0, "positive finite numbers"),
    )
    for name, valid, expected in checks:
        pattern = getattr(config, name)
        if not isinstance(pattern, dict):
            raise _fail(name, pattern, f"a dict of regex -> {expected}")
        for key, value in pattern.items():
            if not isinstance(key, str) or not valid(value):
                raise _fail(name, {key: value}, f"regex string keys and {expected}")
            _check_regex(name, key)


def _check_combinations(config: LoraConfig) -> None:
    if config.lora_bias and config.use_dora:
        raise _fail("lora_bias", True, "lora_bias=False with use_dora=True", "DoRA has no lora_B bias; drop one")
    if config.lora_bias and config.init_lora_weights not in (True, False):
        raise _fail("lora_bias", True, "init_lora_weights True or False with lora_bias",
                    f"init_lora_weights={config.init_lora_weights!r} rewrites the base weight and has no bias term")
    method = config.init_method
    if method.name == "loftq":
        if not config.loftq_config:
            raise _fail("loftq_config", config.loftq_config, "a LoftQConfig when init_lora_weights='loftq'")
        bits, iters = method.options["bits"], method.options["iters"]  # loftq_config's, with PEFT's defaults
        if bits not in (4, 8) or not _is_int(iters) or iters < 1:
            raise _fail("loftq_config", _as_dict(config.loftq_config),
                        "loftq_bits 4 or 8 and loftq_iter >= 1 (as in PEFT)")
    if config.use_dora and config.use_bdlora is not None:
        raise _fail("use_bdlora", config.use_bdlora, "use_bdlora=None with use_dora=True")
    if config.use_bdlora is not None:
        _check_bdlora(config)
    if config.alora_invocation_tokens is not None and config.task_type != "CAUSAL_LM":
        warn("aLoRA is currently only supported for CAUSAL_LM task. (lorakit computes the invocation offsets from "
             "input_ids in PeftModel.forward / generate)")


def _check_bdlora(config: LoraConfig) -> None:
    bd = config.use_bdlora
    assert isinstance(bd, BdLoraConfig)  # the sub-config registry converted it (or raised)
    lists = (bd.target_modules_bd_a or [], bd.target_modules_bd_b or [])
    if not all(isinstance(p, str) for patterns in lists for p in patterns):
        raise _fail("use_bdlora", bd, "target_modules_bd_a / _bd_b as lists of module-name substrings")
    overlap = set(lists[0]) & set(lists[1])
    if overlap:  # PEFT: "Found overlapping modules in target_modules_bd lists"
        raise _fail("use_bdlora", sorted(overlap), "target_modules_bd_a and target_modules_bd_b without overlap")
    if not _is_int(bd.nblocks) or bd.nblocks < 1:
        raise _fail("use_bdlora", {"nblocks": bd.nblocks}, "nblocks a positive int")
    if config.lora_bias:  # a block-diagonal B has no bias: PEFT drops it silently
        raise _fail("lora_bias", True, "lora_bias=False with use_bdlora", "BD-LoRA factors have no bias; drop one")


VALIDATORS = (_check_types, _check_numbers, _check_targets, _check_layers, _check_patterns, _check_combinations)
