"""The CPU's instruction sets from ``/proc/cpuinfo`` text, and what the int8 runner makes of them.

The flag lines are cut from real machines: a Zen 1 EPYC (AVX2 only), a Zen 4 EPYC (AVX-512 with VNNI and
BF16, no AMX) and a Sapphire Rapids Xeon (AMX).
"""

from __future__ import annotations

import logging

import pytest

from cellseg_deploy.cpu import cpu_flags, int8_instructions, vector_instructions

ZEN1 = "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 sha_ni"
ZEN4 = "sse4_2 avx f16c avx2 avx512f avx512dq avx512_bf16 avx512vl avx512_vnni avx512_bitalg"
SPR = "avx2 avx512f avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8"


def _cpuinfo(flags: str) -> str:
    core = f"processor\t: {{n}}\nvendor_id\t: X\nmodel name\t: Some CPU\nflags\t\t: {flags}\nbogomips\t: 1\n"
    return "\n".join(core.format(n=n) for n in range(2))


@pytest.mark.parametrize(
    "flags, vector, int8",
    [
        (ZEN1, ["AVX2"], None),
        (ZEN4, ["AVX2", "AVX-512", "AVX512-VNNI", "AVX512-BF16"], "AVX512-VNNI"),
        (
            SPR,
            ["AVX2", "AVX-512", "AVX512-VNNI", "AVX512-BF16", "AVX-VNNI", "AMX-BF16", "AMX-INT8"],
            "AMX-INT8",
        ),
    ],
)
def test_instruction_sets_from_cpuinfo(flags: str, vector: list[str], int8: str | None) -> None:
    found = cpu_flags(_cpuinfo(flags))
    assert found == frozenset(flags.split())
    assert vector_instructions(found) == vector
    assert int8_instructions(found) == int8


def test_no_flags_line_is_unknown_not_none() -> None:
    assert cpu_flags("processor\t: 0\nmodel name\t: Apple M2\n") == frozenset()
    assert cpu_flags("") == frozenset()
    assert vector_instructions(frozenset()) == []


def test_flags_key_must_be_the_whole_key() -> None:
    """``vmx flags`` (Intel's virtualisation line) is not the feature list."""
    text = "vmx flags\t: ept vpid amx_int8\nflags\t\t: avx2\n"
    assert cpu_flags(text) == frozenset({"avx2"})


def test_the_int8_runner_says_once_when_the_cpu_has_no_int8_instructions(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip(
        "openvino", reason="OpenVINO is not installed: pip install 'cellseg-deploy[openvino]'"
    )
    from cellseg_deploy.backends.openvino import runner

    monkeypatch.setattr(runner, "_warned_no_int8", False)
    with caplog.at_level(logging.WARNING, logger=runner.__name__):
        assert runner._check_int8_instructions(frozenset(ZEN1.split())) == "none"
        assert runner._check_int8_instructions(frozenset(ZEN1.split())) == "none"
    warned = [r.getMessage() for r in caplog.records if "int8" in r.getMessage()]
    assert len(warned) == 1 and "(AVX2;" in warned[0] and "openvino,openvino:int8" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=runner.__name__):
        assert runner._check_int8_instructions(frozenset(SPR.split())) == "AMX-INT8"
        assert runner._check_int8_instructions(frozenset(ZEN4.split())) == "AVX512-VNNI"
        assert runner._check_int8_instructions(frozenset()) == "unknown"
    assert not caplog.records
