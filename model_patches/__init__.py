"""Patches that teach transformers (`model_patches.transformers`) and vLLM (`model_patches.vllm`) to
load and run heterogeneous-width (pruned) MoE checkpoints. They import from heapr_serve, never the
other way round (except heapr_serve/__init__.py, which installs the transformers patch lazily)."""
