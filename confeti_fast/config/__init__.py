"""Configs: plain Python literal files (a dict), read with `ast.literal_eval`.

A config file holds one dict literal. It may name a `_base_` preset whose values it
overrides (nested dicts merge key by key). Presets live in `configs/` and are shipped
inside the package as `confeti_fast.configs`. Training writes the fully resolved config
(no `_base_`) as `config.py` in its work dir, and `test.py` reads that file back.

- `presets`: where presets live, reading one file or preset;
- `schema`: the key and type checks of every layer, and of the resolved config;
- `overrides`: `merge`, `--cfg-options key.path=value` items (`parse_cfg_options`) and
  `--eval-scale`, checked like a file;
- `files`: `load_config` (the `_base_` chain, checked and merged) and `dump_config`.

The names below are re-exported so `from confeti_fast.config import ...` keeps working.
"""
from .files import dump_config, load_config
from .overrides import eval_scale_override, merge, parse_cfg_options
from .presets import PRESET_PACKAGE, preset_names
from .schema import (
    DATASET_TYPES, EVAL_CLASS_SETS, EVAL_MODES, METHODS, OPTIONAL_KEYS, OPTIONAL_VALUES, REQUIRED_KEYS,
    ROOT_PRESET, RUNTIME_CHOICES, check_keys, validate_config,
)

__all__ = [
    "DATASET_TYPES", "EVAL_CLASS_SETS", "EVAL_MODES", "METHODS", "OPTIONAL_KEYS", "OPTIONAL_VALUES",
    "PRESET_PACKAGE", "REQUIRED_KEYS", "ROOT_PRESET", "RUNTIME_CHOICES", "check_keys", "dump_config",
    "eval_scale_override", "load_config", "merge", "parse_cfg_options", "preset_names", "validate_config",
]
