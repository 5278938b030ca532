"""Stage 5, serve: the vLLM plugin. `plugin` registers the architectures, `models` derives each
family's `Heapr*ForCausalLM` from the family registry, `layer` is the ragged routed-experts layer and its
checked loader, `buckets` plans width buckets, `kernels/` holds the GPU kernel."""
