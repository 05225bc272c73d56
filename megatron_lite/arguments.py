"""Megatron-compatible command-line flags and `--config FILE.yaml`, both turned into a validated `Config`.

The parser is generated from the dataclass fields in `config.py`: each field's metadata names its flag.
Precedence: dataclass default < YAML file < command-line flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Optional, Sequence, Union, get_args, get_origin

import yaml

from megatron_lite.config import SECTIONS, Config, ConfigError


def _flag_for(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _scalar_type(f: dataclasses.Field) -> type:
    if f.metadata.get("type"):
        return f.metadata["type"]
    annotation = f.type if not isinstance(f.type, str) else eval(f.type, {"Optional": Optional, "list": list})  # noqa: S307
    if get_origin(annotation) is Union:
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return str if annotation is list else annotation


def build_parser(extra_args_provider=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="megatron_lite: Megatron-compatible GPT pretraining.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file setting any of the fields below (flags override it).")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "help": f.metadata.get("help", ""),
                                      "default": argparse.SUPPRESS}
            action = f.metadata.get("action")
            if action:
                kwargs["action"] = action
            else:
                kwargs["type"] = _scalar_type(f)
                kwargs["metavar"] = f.name.upper()
                if f.metadata.get("choices"):
                    kwargs["choices"] = f.metadata["choices"]
                    kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
                if f.metadata.get("nargs"):
                    kwargs["nargs"] = f.metadata["nargs"]
            group.add_argument(_flag_for(f), **kwargs)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


def _yaml_values(path: str) -> dict[str, dict[str, Any]]:
    """Read a YAML preset: keys may be nested under section names or flat; dashes or underscores."""
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field names to values, got {type(raw).__name__}.")
    owner = {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}

    def put(key: str, value: Any) -> None:
        name = key.replace("-", "_")
        if name not in owner:
            raise ConfigError(f"--config {path}: unknown key {key!r}. Use a field name such as "
                              f"'tensor_model_parallel_size' (see --help for all flags).")
        values[owner[name]][name] = value

    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                put(sub_key, sub_value)
        else:
            put(key, value)
    return values


def parse(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None,
          extra_args_provider=None, validate: bool = True) -> Config:
    """Parse flags (and --config) into a validated Config. Raises ConfigError on any invalid setting."""
    parser = build_parser(extra_args_provider)
    namespace = parser.parse_args(argv)
    cfg = Config(world_size=world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    if namespace.config:
        for section, fields in _yaml_values(namespace.config).items():
            for name, value in fields.items():
                setattr(getattr(cfg, section), name, value)
    extras = {}
    for dest, value in vars(namespace).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            setattr(getattr(cfg, section), name, value)
        elif dest != "config":
            extras[dest] = value
    cfg.extra = extras  # flags added by extra_args_provider (e.g. by tools)
    if cfg.parallel.auto_parallel:  # before validation: the planner sets the layout, explicit flags win
        from megatron_lite.planner.auto import apply_auto_parallel
        given = {dest.split(".", 1)[1] for dest in vars(namespace) if "." in dest}
        if namespace.config:
            given |= {name for fields in _yaml_values(namespace.config).values() for name in fields}
        apply_auto_parallel(cfg, given)
    if validate:
        cfg.validate()
        if os.environ.get("RANK", "0") == "0":
            for note in cfg.notes:
                print(f"note: {note}", file=sys.stderr, flush=True)
    return cfg
