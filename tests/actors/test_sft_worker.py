"""The SFT worker's start-up: torch.compile decorators are no-ops while DeepSpeed initialises, and only then."""

import os

import torch

from actors.sft.worker import DYNAMO_DISABLE_ENV, compile_decorators_off


def _identity(x):
    return x


def test_torch_compile_is_a_no_op_inside_and_the_variable_is_restored_after(monkeypatch):
    """An upgrade of torch that stops reading the variable at each torch.compile call must fail here (DeepSpeed's
    initialisation would import TorchInductor again in every SFT worker), not slow every SFT stage silently."""
    monkeypatch.delenv(DYNAMO_DISABLE_ENV, raising=False)
    with compile_decorators_off():
        assert torch.compile(_identity) is _identity
    assert DYNAMO_DISABLE_ENV not in os.environ
    assert torch.compile(_identity) is not _identity
    monkeypatch.setenv(DYNAMO_DISABLE_ENV, "0")
    with compile_decorators_off():
        assert os.environ[DYNAMO_DISABLE_ENV] == "1"
    assert os.environ[DYNAMO_DISABLE_ENV] == "0"
