"""The error every configuration rule raises, and the one way rules phrase it (flag, problem, fix)."""
from __future__ import annotations


class ConfigError(ValueError):
    """An invalid configuration. The message names the flag, the values and a valid alternative."""


def fail(flag: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{flag}: {problem}. {fix}")
