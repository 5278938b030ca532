"""Stage 5, serve: the vLLM plugin. `plugin` registers the architectures, `models` derives each
family's `Heapr*ForCausalLM` from the family registry, `layer` is the ragged routed-experts layer and its
checked loader, which picks one method per backend (`cpu_buckets`, `cpu_ragged`, `cuda_ragged`,
`cuda_buckets` on `ragged_method`; `quantized`; all on `base`), `buckets` plans width buckets,
`kernels/` holds the GPU kernel."""
