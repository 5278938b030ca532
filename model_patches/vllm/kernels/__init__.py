"""Kernels for ragged (heterogeneous-width) MoE layers."""
