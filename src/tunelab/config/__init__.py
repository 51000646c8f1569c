"""Typed, validated configuration: YAML recipes plus dotted ``key=value`` overrides.

``schema`` holds the sections, keys, types, defaults and help (once); ``keys`` the dotted keys and the bounds
on a recipe; ``yaml_reader`` reads YAML within bounds; ``parse`` builds a Config from a recipe and overrides;
``checks`` holds the cross-field rules, pure functions over a built config.
"""

from .checks import check
from .keys import INT_LIMIT, MAX_RECIPE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, SEED_LIMIT, all_keys, flatten, suggest
from .parse import load_config, parse_override, parse_section, save_config
from .schema import (
    ChatConfig,
    ClassifyConfig,
    ColumnsConfig,
    Config,
    DataConfig,
    EvalConfig,
    InstructConfig,
    KDConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    SNIConfig,
    SourceConfig,
    SyntheticConfig,
    TaskConfig,
    TemplateConfig,
    TrainConfig,
)
from .yaml_reader import read_yaml

__all__ = ["INT_LIMIT", "MAX_RECIPE_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "SEED_LIMIT", "ChatConfig",
           "ClassifyConfig", "ColumnsConfig", "Config", "DataConfig", "EvalConfig", "InstructConfig", "KDConfig",
           "LoraConfig", "ModelConfig", "OutputConfig", "SNIConfig", "SourceConfig", "SyntheticConfig", "TaskConfig",
           "TemplateConfig", "TrainConfig", "all_keys", "check", "flatten", "load_config", "parse_override",
           "parse_section", "read_yaml", "save_config", "suggest"]
