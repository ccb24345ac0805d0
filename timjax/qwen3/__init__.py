"""The model layer: the Qwen3 forward as plain functions over a params pytree (``model``) and the
parameter layout with its Hugging Face name table (``params``)."""
