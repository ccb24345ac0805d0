"""timjax: TIM and TIMRUN in JAX/Flax.

Public API: ``load``, ``logits``, ``generate``; the model class ``Qwen3`` and its ``Qwen3Config``.
Attributes are imported on first use, so ``import timjax.cli`` (and ``timjax --help``) does not load JAX.
"""

from importlib import import_module

_EXPORTS = {
    "load": "timjax.api",
    "generate": "timjax.api",
    "logits": "timjax.qwen3.model",
    "Qwen3": "timjax.qwen3.model",
    "random_model": "timjax.qwen3.model",
    "Qwen3Config": "timjax.base.config",
    "Engine": "timjax.engine",
    "GenerationResult": "timjax.base.results",
    "GenerationStats": "timjax.base.results",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'timjax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
