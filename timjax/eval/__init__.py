"""Evaluating a TIM: accuracy and working-memory figures over pruning settings (``timjax eval``).

``timjax.eval.run``: ``evaluate``, ``heldout_problems``, ``SETTINGS``, ``EvalReport``."""
