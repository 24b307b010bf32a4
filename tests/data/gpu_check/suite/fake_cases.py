"""A small fake test suite that tests/test_gpu_check.py runs through scripts/gpu_check.sh and its
pytest plugin (not collected by the real suite: the name does not match test_*.py).

Every outcome the report must count: passed, failed, an error in a fixture, skipped, xfailed, a
test not run because the run was cut, and tests of both backends (``cuda`` in the id)."""
import os
import time

import pytest


def test_passes():
    pass


def test_fails():
    value = 1 + 1
    assert value == 3, "arithmetic is broken"


@pytest.fixture
def broken_fixture():
    raise RuntimeError("the fixture could not be set up")


def test_setup_error(broken_fixture):
    pass


def test_skipped():
    pytest.skip("nothing to check here")


@pytest.mark.xfail(reason="a known failure")
def test_known_failure():
    assert False


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_op_parity(backend):
    pass


def test_cuda_only_failure_and_crash_on_request():
    if os.environ.get("FAKE_SUITE_CRASH"):
        os._exit(3)  # a crashed pytest worker
    assert os.environ.get("FAKE_SUITE_CUDA_OK"), "the CUDA kernel returned garbage"


def test_sleeps_on_request():
    time.sleep(float(os.environ.get("FAKE_SUITE_SLEEP", "0")))


def test_passes_last():
    pass


@pytest.mark.slow
def test_slow_is_never_selected():
    pass
