"""heapr-serve: HEAPr atomic-expert pruning for MoE LLMs, served by vLLM with its real savings.

Importing the package installs the transformers patch, so that
``AutoModelForCausalLM.from_pretrained`` loads pruned (ragged-width) checkpoints.
"""

__version__ = "0.1.0"

from model_patches import transformers_patch as _transformers_patch  # noqa: E402

_transformers_patch.install_lazily()
