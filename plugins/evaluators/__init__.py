"""Built-in evaluators for any causal language model."""
