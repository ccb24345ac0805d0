"""timjax: TIM and TIMRUN in JAX/Flax.

Public API: ``load``, ``logits``, ``generate``; the model class ``Qwen3`` and its ``Qwen3Config``.
"""

from timjax.api import generate, load
from timjax.config import Qwen3Config
from timjax.model import Qwen3, logits, random_model
from timjax.results import GenerationResult, GenerationStats

__all__ = ["load", "logits", "generate", "Qwen3", "Qwen3Config", "random_model", "GenerationResult",
           "GenerationStats"]
__version__ = "0.1.0"
