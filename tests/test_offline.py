"""Offline means offline: tests that need the package registry skip, with the reason, without it."""

import sys

from conftest import TESTS, run_command, script_env


def test_registry_tests_skip_with_the_reason_when_the_registry_cannot_be_reached() -> None:
    # The discard port: nothing answers there, as on a machine with no network.
    env = script_env(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_EXTRA_INDEX_URL="")
    args = [sys.executable, "-m", "pytest", TESTS / "test_data.py", "-m", "registry", "-rs", "-p"]
    proc = run_command([*args, "no:cacheprovider"], env=env)
    assert proc.returncode == 0, proc.stdout
    assert "1 skipped" in proc.stdout
    assert "the package registry cannot be reached: ERROR:" in proc.stdout
