"""Importing mft_trainer silences the dependency messages a user can do nothing about, and no others."""

import logging
import subprocess
import sys

import pytest

import mft_trainer  # noqa: F401  (installs the filters)
from mft_trainer.library_noise import KNOWN_NOISE


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name", sorted(KNOWN_NOISE))
def test_known_noise_is_dropped_and_other_warnings_of_the_library_still_show(name):
    logger = logging.getLogger(name)
    collect = _Collect()
    logger.addHandler(collect)
    try:
        for beginning in KNOWN_NOISE[name]:
            logger.warning(beginning + " (the rest of the message)")
        logger.warning("something the user should read")
    finally:
        logger.removeHandler(collect)
    assert collect.messages == ["something the user should read"]


def test_importing_deepspeed_after_mft_trainer_prints_no_accelerator_notice():
    pytest.importorskip("deepspeed")
    code = "import mft_trainer, deepspeed, bitsandbytes"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    output = run.stdout + run.stderr
    assert "Setting accelerator to CPU" not in output
    assert "kernels-community" not in output


def test_peft_reading_the_deprecated_checkpointing_property_warns_nobody():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        from mft_trainer.library_noise import silence_library_noise

        silence_library_noise()  # catch_warnings reset the filters
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`gradient_checkpointing_enable` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("another deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["another deprecation"]


def test_a_command_prints_no_dependency_notice():
    from .conftest import REPO

    run = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--help"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.strip() == ""  # the help on stdout, nothing else
    assert "Setting accelerator to CPU" not in run.stdout
