"""orpo: fine-tune causal language models on preference pairs with ORPO, in one stage.

The public API; everything else is internal and may change.
"""

__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402

__all__ = ["TrainConfig", "__version__"]
