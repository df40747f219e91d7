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

import ml_collections

from sora_jax import configs
from sora_jax.errors import ConfigError

__all__ = ["ConfigError", "apply_overrides", "from_json", "load_config", "packaged_config_dir",
           "resolve_config_path", "set_value", "to_json"]


def packaged_config_dir() -> str:
    """The folder of the configs that ship with sora-jax (``sora_jax.configs``; the repo's
    top-level ``configs/``)."""
    return os.path.dirname(configs.__file__)


def resolve_config_path(spec: str) -> tuple[str, str]:
    """``path/to/config.py[:arg]`` or a packaged config's name ``NAME[:arg]`` (e.g.
    ``dit_ladder:B``, the file ``sora_jax/configs/dit_ladder.py``) -> (file path, arg).

    A path that exists wins over a packaged name; the name form works the same from an
    installed wheel and from a source checkout.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path) and os.sep not in path and not path.endswith(".py"):
        packaged = os.path.join(packaged_config_dir(), f"{path}.py")
        if os.path.isfile(packaged):
            return packaged, arg
    return path, arg


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:arg]`` (or a packaged ``NAME[:arg]``, see
    :func:`resolve_config_path`) and returns ``get_config(arg)``.

    Config files import their shared pieces as ``sora_jax.configs.common``, so a copy of a
    config anywhere on disk loads the same way.

    Raises:
      ConfigError: the file is missing or defines no ``get_config``, or it fails to load.
    """
    path, arg = resolve_config_path(spec)
    if not os.path.isfile(path):
        names = sorted(n[:-3] for n in os.listdir(packaged_config_dir())
                       if n.endswith(".py") and n not in ("__init__.py", "common.py"))
        raise ConfigError(f"config file not found: {path} (or name a packaged config: "
                          f"{', '.join(names)})")
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
        if text.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
            return float(text)  # a float the config checks then name, not a string
        return text  # bare strings: --config.dit.attention_backend=xla


def set_value(cfg: ml_collections.ConfigDict, key: str, value, text: str | None = None):
    """Sets the existing field ``a.b.c`` of ``cfg`` to ``value`` (a list becomes a tuple where
    the field holds a tuple, an int a float where it holds a float).

    Raises:
      ConfigError: unknown key, or a value whose type does not match the field (``text``: the
        value as the user typed it, for the message).
    """
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key '{'.'.join(parents[: i + 1])}'")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"unknown config key '{key}'")
    current = node[leaf]
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        shown = repr(value) if text is None else repr(text)
        raise ConfigError(f"bad value for config key '{key}': {shown} ({e})") from None


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies ``a.b.c=value`` strings (the ``--config.`` prefix already stripped) in order.

    Raises:
      ConfigError: unknown key, or a value whose type does not match the field.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' needs the form key=value")
        set_value(cfg, key, _parse_value(text), text)
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
