"""Which dtype the frozen base computes in: ``fp32``, ``bf16``, or ``auto`` (bf16 where it is faster).

A LoRA step computes y = W x + s·B A x: the frozen W (almost all of the parameters and FLOPs) and the
trainable factors A, B. Under ``bf16`` the frozen weights are held in bfloat16, so W x runs in bfloat16
(AMX / AVX512-BF16 matmuls on CPUs that have them, about 6x float32's rate on this project's Xeon); A, B,
their gradients and AdamW's moments stay float32, so the update and the saved adapter are exactly what a
float32 run would store (PEFT's rule: adapters of a half-precision base are float32; the layer casts x
up for its branch and the sum back down, layer.py). Buffers (RoPE's inverse frequencies) are left alone.

``auto`` picks bf16 when the CPU reports AMX-BF16 or AVX512-BF16 (``/proc/cpuinfo``) and a probe, a
matmul of a transformer projection's shape timed in both dtypes, says bfloat16 is at least
``AUTO_MARGIN`` times faster; on CUDA it picks bf16 where ``torch.cuda.is_bf16_supported()``. Without
such a CPU bfloat16 matmuls are emulated and several times slower than float32, so an explicit ``bf16``
there is refused with that explanation.

The step itself runs under ``torch.autocast`` in that dtype (``compute``): with the base already bf16
it only lowers the LoRA factors' matmuls, so the branches use the same bf16 units instead of casting x
up to float32 (measured faster than those explicit casts; BENCHMARKS.md). Gradients still reach the
float32 factors in float32.

In your own loop::

    choice = decide("auto")                    # Choice(dtype=torch.bfloat16, reason="...")
    hold_frozen_in(peft_model, choice.dtype)   # after get_peft_model: adapters stay float32
    with compute(choice.dtype):
        loss = peft_model(**batch).loss        # or lorakit.app.lm_loss.causal_lm_loss (logits at labels only)
    loss.backward()
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHOICES = ("auto", *PRECISIONS)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
AUTO_MARGIN = 1.25  # bf16 must be this much faster in the probe: the casts around LoRA branches cost a little
PROBE_SHAPE = (512, 576, 1536)  # tokens x hidden @ hidden x intermediate: SmolLM2's gate/up projection


@dataclass(frozen=True)
class Probe:
    """Milliseconds of one probe matmul in each dtype (the best of a few tries)."""

    fp32_ms: float
    bf16_ms: float

    @property
    def speedup(self) -> float:
        return self.fp32_ms / max(self.bf16_ms, 1e-9)


@dataclass(frozen=True)
class Choice:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return next(name for name, dtype in PRECISIONS.items() if dtype == self.dtype)


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The CPU's bfloat16 matmul features among BF16_FLAGS (empty where /proc/cpuinfo is missing)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return tuple(flag for flag in BF16_FLAGS if flag in flags)


def probe_speed(shape: tuple[int, int, int] = PROBE_SHAPE, tries: int = 5) -> Probe:
    """Time (m, k) @ (k, n) in float32 and in bfloat16 on the CPU, best of ``tries`` after one warm-up each.

    The two are timed alternately, round by round, so that other work on the machine slows both alike.
    """
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    times: dict[str, list[float]] = {name: [] for name in pairs}
    for x, y in pairs.values():
        x @ y  # warm-up
    for _ in range(tries):
        for name, (x, y) in pairs.items():
            start = time.perf_counter()
            x @ y
            times[name].append(time.perf_counter() - start)
    return Probe(fp32_ms=min(times["fp32"]) * 1e3, bf16_ms=min(times["bf16"]) * 1e3)


def decide(requested: str, device: torch.device | str = "cpu",
           flags: Callable[[], tuple[str, ...]] | None = None, probe: Callable[[], Probe] | None = None) -> Choice:
    """The dtype to hold the frozen base in for ``requested`` (one of CHOICES) on ``device``.

    ``flags`` and ``probe`` (default: ``cpu_bf16_flags`` and ``probe_speed``) are injectable (tests, or a
    user who already measured).

    Raises:
        ValueError: an unknown ``requested``, or "bf16" on a CPU without bfloat16 matmul instructions.
    """
    if requested not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)}; got {requested!r}")
    device = torch.device(device)
    if requested == "fp32":
        return Choice(torch.float32, "fp32 requested")
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not supported:
            raise ValueError("precision bf16: this CUDA device does not support bfloat16; use fp32 or auto")
        if supported:
            return Choice(torch.bfloat16, f"{requested}: the CUDA device supports bfloat16")
        return Choice(torch.float32, "auto: the CUDA device has no bfloat16 support")
    if device.type != "cpu":
        if requested == "bf16":
            return Choice(torch.bfloat16, "bf16 requested")
        return Choice(torch.float32, f"auto: no bfloat16 probe for {device.type}, so float32")
    found = (flags or cpu_bf16_flags)()
    if not found:
        if requested == "bf16":
            raise ValueError(f"precision bf16: this CPU has none of {', '.join(BF16_FLAGS)}, so bfloat16 matmuls "
                             "would be emulated, several times slower than float32; use --precision fp32 (or auto, "
                             "which picks fp32 here)")
        return Choice(torch.float32, f"auto: the CPU has none of {', '.join(BF16_FLAGS)}")
    if requested == "bf16":
        return Choice(torch.bfloat16, f"bf16 requested (CPU: {', '.join(found)})")
    measured = (probe or probe_speed)()
    verdict = (f"auto: CPU has {', '.join(found)}; probe matmul {measured.fp32_ms:.1f} ms fp32, "
               f"{measured.bf16_ms:.1f} ms bf16 ({measured.speedup:.1f}x)")
    if measured.speedup >= AUTO_MARGIN:
        return Choice(torch.bfloat16, verdict)
    return Choice(torch.float32, f"{verdict}, under the {AUTO_MARGIN}x needed, so fp32")


def compute(dtype: torch.dtype, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` in ``dtype`` on ``device`` for a half dtype; nothing for float32 / float64."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


def hold_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every floating-point parameter that does not train to ``dtype`` in place; returns how many.

    Call it after ``get_peft_model`` (the adapters are created float32 and stay so; so do modules_to_save
    copies, which train). Quantized weights (not floating point) and buffers are left as they are.
    """
    count = 0
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
            count += 1
    return count
