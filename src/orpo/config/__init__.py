"""The run's configuration: one typed dataclass that is the schema, the CLI and the documentation at once.

Precedence, lowest to highest: the defaults of ``TrainConfig``, then a YAML file, then command-line flags
(``orpo train`` without a YAML file starts from the default job's recipe in its place; see cli/__init__.py). TRL's
names for the same options are read too (``trl_names.py``). The resolved result is written to
``OUT/config.yaml`` and can be fed back in unchanged. This package imports no torch.
"""

from .files import (TRACKERS, build, coerce, dump_yaml, field_type, fields, load_yaml, report_targets, suggest,
                    validate, with_changes)
from .schema import (FULL_FINETUNE_LR, LORA_LR, LOW_MEMORY, NOT_IN_FINGERPRINT, OPTIMIZERS, TrainConfig, cache_root, column_map, is_in_memory,
                     memory_label, opt)
from .runs import eval_options, run_folder
from .trl_names import ALIASES as TRL_ALIASES

__all__ = ["FULL_FINETUNE_LR", "LORA_LR", "LOW_MEMORY", "NOT_IN_FINGERPRINT", "OPTIMIZERS", "TRACKERS", "TRL_ALIASES", "TrainConfig", "build",
           "cache_root", "coerce", "column_map", "dump_yaml", "eval_options", "field_type", "fields", "is_in_memory", "load_yaml",
           "memory_label", "opt", "report_targets", "run_folder", "suggest", "validate", "with_changes"]
