"""heapr-serve: HEAPr atomic-expert pruning for MoE LLMs, served by vLLM with its real savings.

The data path is the folder names: calibrate -> score -> prune -> checkpoint -> (model_patches: load
in transformers, serve in vLLM) -> eval -> ab. docs/architecture.md has the map and the import rule.
Importing the package installs the transformers patch (lazily), so that
``AutoModelForCausalLM.from_pretrained`` loads pruned (ragged-width) checkpoints.
"""

__version__ = "0.1.0"

from model_patches import transformers as _transformers_patch  # noqa: E402

_transformers_patch.install_lazily()
