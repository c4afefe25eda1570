"""The `flagship` marker (tests/conftest.py): with the project's pytest options a skipped test is listed with its
reason, and a skipped flagship test fails under CI=true."""

from __future__ import annotations

import pytest

TESTS = """
import pytest

@pytest.mark.flagship
@pytest.mark.skipif(True, reason="java is not installed")
def test_promise():
    pass

@pytest.mark.skipif(True, reason="an optional extra")
def test_other():
    pass

@pytest.mark.flagship
def test_promise_in_the_body():
    pytest.skip("chromium is not installed")

@pytest.mark.flagship
def test_promise_that_runs():
    pass
"""


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest("from tests.conftest import pytest_configure, pytest_runtest_makereport  # noqa: F401")
    pytester.makepyfile(TESTS)
    return pytester


def test_a_skipped_flagship_test_fails_under_ci(inner, monkeypatch, request):
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest(*request.config.getini("addopts"), "--strict-markers")
    result.assert_outcomes(errors=1, failed=1, skipped=1, passed=1)  # a skip in setup fails as an error
    result.stdout.fnmatch_lines(["*flagship test skipped under CI=true, where it must run: *java is not installed*",
                                 "*flagship test skipped under CI=true, where it must run: *chromium is not installed*",
                                 "SKIPPED*an optional extra"], consecutive=False)


def test_elsewhere_it_skips_and_says_why(inner, monkeypatch, request):
    monkeypatch.delenv("CI", raising=False)
    result = inner.runpytest(*request.config.getini("addopts"), "--strict-markers")  # the project's options
    result.assert_outcomes(skipped=3, passed=1)
    result.stdout.fnmatch_lines(["SKIPPED*java is not installed", "SKIPPED*an optional extra",
                                 "SKIPPED*chromium is not installed"], consecutive=False)
