"""Loading python config files and applying ``--config.a.b=value`` overrides.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``; ``path:arg`` passes
``arg`` (as ``ml_collections.config_flags`` does). Overrides are parsed as Python literals and
type-checked by ConfigDict, so a typo or a wrong type is reported by name instead of ignored.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys

import ml_collections


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key or path."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:arg]`` and returns ``get_config(arg)``.

    Raises:
      ConfigError: the file is missing or defines no ``get_config``.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:  # lets configs import their siblings as ``configs.common``
        sys.path.insert(0, root)
    name = f"_sora_config_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a config file is user code: report where it broke, in one line
        raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    return module.get_config(arg or None)


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # bare strings: --config.dit.attention_backend=xla


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies ``a.b.c=value`` strings (the ``--config.`` prefix already stripped) in order.

    Raises:
      ConfigError: unknown key, or a value whose type does not match the field.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' needs the form key=value")
        *parents, leaf = key.split(".")
        node = cfg
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(f"unknown config key '{'.'.join(parents[: i + 1])}'")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(f"unknown config key '{key}'")
        value = _parse_value(text)
        current = node[leaf]
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad value for config key '{key}': {text!r} ({e})") from None
    return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """Serialises a config for checkpoints and run folders (tuples become lists)."""
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of ``to_json`` up to tuples, which come back as tuples of lists' items."""

    def fix(x):
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(fix(v) for v in x)
        return x

    return ml_collections.ConfigDict(fix(json.loads(text)))
