"""Training a TIM: the synthetic corpus, its small vocabulary, supervised fine-tuning and a first GRPO loop.

``corpus``      problems (arithmetic, multi-hop lookups) and their complete TIM documents with real tool results
``runtime_view`` a document as the runtime writes it: token ids, what the model wrote (loss) and what was forced,
                 and the pruned working-memory views at compacted positions
``tokenizer``   a byte-level BPE trained on the corpus, saved as a Hugging Face tokenizer directory
``sft``         the optax training loop over ``timjax.qwen3.model.forward`` with orbax checkpoints
``grpo``        group-relative policy optimisation with rollouts from timjax's own engine
"""
