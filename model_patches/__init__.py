"""Patches that teach transformers and vLLM to load heterogeneous-width (pruned) MoE checkpoints."""
