"""orpo: fine-tune causal language models on preference pairs with ORPO, in one stage.

The public API; everything else is internal and may change::

    import orpo
    config = orpo.TrainConfig(model="path/to/model", data=dataset, lora=True, max_steps=100)
    result = orpo.train(config)                     # -> orpo.RunResult
    metrics = orpo.evaluate(result.model_dir, held_out)
    orpo.export_model(result.output_dir, gguf=True)

``orpo.default_job(**changes)`` is the config of ``orpo train`` (the default job) with some options changed.
"""

import sys as _sys
import types as _types

__version__ = "0.1.0"

from .api import default_job, evaluate, export_model, train  # noqa: E402
from .config import TrainConfig  # noqa: E402

__all__ = ["RunResult", "TrainConfig", "__version__", "default_job", "evaluate", "export_model", "train"]


def __getattr__(name):
    if name == "RunResult":  # defined with the loop, which imports torch: only when asked for
        from .train import RunResult

        return RunResult
    raise AttributeError(f"module 'orpo' has no attribute {name!r}")


class _Package(_types.ModuleType):
    """``orpo.train`` and ``orpo.evaluate`` are the API's functions, though ``orpo/train/`` and
    ``orpo/evaluate.py`` are modules too: importing a submodule sets the package attribute of its name,
    which would replace the function the first time the module is imported. ``from orpo.train import X``
    still reaches the module (through sys.modules)."""

    def __setattr__(self, name, value):
        if name in ("train", "evaluate") and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
