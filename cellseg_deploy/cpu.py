"""What the host CPU's vector units can do, from the ``flags`` line of ``/proc/cpuinfo``.

The same marketing name covers very different machines ("AMD EPYC" is a Zen 1 with AVX2 only as well as a
Zen 4 with AVX-512 VNNI and BF16), and what is fast depends on them: OpenVINO runs an int8 IR on any x86 CPU,
but only VNNI or AMX give int8 convolutions that beat fp32 ones; without them the int8 kernels are emulated
with AVX2 or AVX-512 multiply-adds and can be slower than fp32. Benchmarks therefore name the instruction
sets beside the CPU, and the int8 runner says when it has none of the int8 ones.

The flags are Linux's spelling (``avx512_vnni``, ``amx_int8``); elsewhere nothing is known and every
function here says so (an empty set, ``None``) instead of guessing.
"""

from __future__ import annotations

from pathlib import Path

INT8_INSTRUCTIONS: tuple[tuple[str, str], ...] = (
    ("amx_int8", "AMX-INT8"),
    ("avx512_vnni", "AVX512-VNNI"),
    ("avx_vnni", "AVX-VNNI"),
)
"""``(Linux flag, name)`` of the instruction sets with int8 dot products, the fastest first."""

VECTOR_FLAGS: tuple[tuple[str, str], ...] = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_vnni", "AVX512-VNNI"),
    ("avx512_bf16", "AVX512-BF16"),
    ("avx_vnni", "AVX-VNNI"),
    ("amx_bf16", "AMX-BF16"),
    ("amx_int8", "AMX-INT8"),
)
"""``(Linux flag, name)`` of the vector instruction sets a benchmark reader needs to know, in report order."""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (the text of ``/proc/cpuinfo``; read from there when
    ``None``); empty where there is no such file or line (not Linux), which means unknown, not "none"."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def vector_instructions(flags: frozenset[str]) -> list[str]:
    """The names of :data:`VECTOR_FLAGS` present in ``flags``, e.g. ``["AVX2"]`` on a Zen 1 EPYC."""
    return [name for flag, name in VECTOR_FLAGS if flag in flags]


def int8_instructions(flags: frozenset[str]) -> str | None:
    """The fastest int8 dot-product instruction set in ``flags`` (:data:`INT8_INSTRUCTIONS`), ``None`` when
    there is none (or ``flags`` is empty: unknown)."""
    for flag, name in INT8_INSTRUCTIONS:
        if flag in flags:
            return name
    return None
