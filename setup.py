"""Install megatron_lite. Metadata lives in pyproject.toml; this file exists for `pip install -e .` on old pips."""
from setuptools import setup

setup()
