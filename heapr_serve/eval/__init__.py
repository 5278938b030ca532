"""Stage 6, eval: held-out perplexity (transformers or a served endpoint) and lm-eval tasks."""
