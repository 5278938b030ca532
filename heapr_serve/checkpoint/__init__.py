"""Stage 4, checkpoint: the pruned format (names, the `heapr` config section), validation, the
streamed writer, the model card, and `inspect`."""
