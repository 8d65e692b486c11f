"""Device names and the TF32 switch (cellseg_deploy.backends.devices), on the CPU."""

from __future__ import annotations

import pytest
import torch

from cellseg_deploy.backends.devices import (
    device_name,
    parse_device,
    restore_tf32,
    set_tf32,
    tf32,
    tf32_state,
    torch_device,
)
from cellseg_deploy.errors import ConfigError


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("cuda", torch.device("cuda", 0)),
        ("CUDA", torch.device("cuda", 0)),
        ("cuda:1", torch.device("cuda", 1)),
        (torch.device("cuda"), torch.device("cuda", 0)),
        (torch.device("cuda", 2), torch.device("cuda", 2)),
        ("cpu", torch.device("cpu")),
        (torch.device("cpu"), torch.device("cpu")),
    ],
)
def test_torch_device_is_indexed_for_cuda(given: object, expected: torch.device) -> None:
    got = torch_device(given)
    assert got == expected
    if got.type == "cuda":
        # torch.cuda.set_device refuses a CUDA device without an index; this one has it.
        assert got.index is not None


def test_device_name_and_parse() -> None:
    assert device_name("cuda") == "cuda:0"
    assert device_name(torch.device("cuda", 3)) == "cuda:3"
    assert device_name("cpu") == "cpu"
    assert parse_device("cuda:5") == ("cuda", 5)
    assert parse_device("cpu") == ("cpu", None)


@pytest.mark.parametrize("bad", ["nvidia", "cuda:x", "cuda:-1", "mps", "", "cpu:1"])
def test_bad_names_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="device"):
        parse_device(bad)


def test_parse_device_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from cellseg_deploy.backends.devices import device_name; "
        "assert device_name('cuda') == 'cuda:0'; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_set_tf32_sets_both_switches_and_returns_the_old_state() -> None:
    before = tf32_state()
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        previous = set_tf32()  # default: off
        assert previous.matmul and previous.cudnn
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        assert tf32_state().as_info() == {"tf32_matmul": False, "tf32_cudnn": False}
        assert not tf32_state().enabled
    finally:
        restore_tf32(before)
    assert tf32_state() == before


def test_tf32_context_restores() -> None:
    before = tf32_state()
    with tf32(not before.cudnn) as inside:
        assert inside.cudnn is (not before.cudnn)
        assert torch.backends.cudnn.allow_tf32 is (not before.cudnn)
    assert tf32_state() == before
