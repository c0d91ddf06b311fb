"""Which precision ``--precision auto`` (the default) trains in on the device in hand.

bf16 autocast pays only where the hardware multiplies bf16 natively. On a CPU without bf16 dot-product
instructions (x86 without AVX512_BF16 or AMX, Arm without the BF16 extension: most laptops, AMD EPYC
before Zen 4) torch emulates it, and every matmul is slower than in fp32: on an AVX2 EPYC, a
(1024 x 576) @ (576 x 1536) product took 0.22 s under bf16 autocast against 0.03 s in fp32, and the
default job trained at ~10 tokens/s against ~145 (benchmarks/README.md). fp32 there is both faster and
exact, so ``auto`` picks it; bf16 where the CPU or the GPU has it natively. The choice is made once, at
the start of a run, and recorded in its config.yaml, so a resume on the same machine makes the same one
(on another kind of machine, a resume says "precision changed": pass the run's own ``--precision``).
"""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

CHOICES = ("auto", "bf16", "fp32")
X86_BF16 = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products


@lru_cache(maxsize=1)
def cpu_bf16() -> tuple[bool, str]:
    """(whether this CPU multiplies bf16 natively, what it has, in a few words)."""
    machine = platform.machine().lower()
    if platform.system() == "Darwin" and machine == "arm64":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        return out == "1", "Apple silicon with BF16" if out == "1" else "Apple silicon without BF16"
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False, "a CPU whose instructions could not be read"
    return from_cpuinfo(info, machine)


def from_cpuinfo(info: str, machine: str) -> tuple[bool, str]:
    """:func:`cpu_bf16` from the text of /proc/cpuinfo and ``platform.machine()``."""
    words = set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            words.update(value.split())
    if machine in ("aarch64", "arm64"):
        return "bf16" in words, "an Arm CPU with BF16" if "bf16" in words else "an Arm CPU without BF16"
    native = [f for f in X86_BF16 if f in words]
    if native:
        return True, f"a CPU with {', '.join(f.upper() for f in native)}"
    best = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in words),
                "no AVX")
    return False, f"a CPU with {best} but no native bf16"


def resolve(precision: str, device_type: str) -> tuple[str, str | None]:
    """``precision`` ('auto', 'bf16' or 'fp32') on a device type -> (bf16 or fp32, the one line that says
    why, for 'auto' only)."""
    if precision != "auto":
        return precision, None
    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ("bf16", None) if ok else ("fp32", "precision: fp32 (auto: this GPU has no bf16)")
    if device_type != "cpu":
        return "fp32", f"precision: fp32 (auto: bf16 autocast is not checked on {device_type})"
    native, what = cpu_bf16()
    if native:
        return "bf16", None
    return "fp32", (f"precision: fp32 (auto: {what}, where bf16 autocast is emulated and several times slower "
                    "than fp32; --precision bf16 forces it)")


def run_device_type() -> str:
    """The device a run will use, as Accelerate picks it: a GPU where there is one."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"
