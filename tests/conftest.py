import os

# Keep each test process (and the ranks it spawns) on one thread: the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_configure(config):
    # pyproject.toml sets `timeout = 600` so a hang fails the test instead of stalling CI. Without the
    # pytest-timeout plugin that line is silently ignored (only a warning about an unknown ini key):
    # refuse to run instead of losing the limit.
    if not config.pluginmanager.hasplugin("timeout"):
        import pytest
        raise pytest.UsageError("pytest-timeout is not installed, so the per-test 600 s limit would be silently "
                                "ignored: pip install pytest-timeout (it is in the dev extra: pip install -e '.[dev]').")
