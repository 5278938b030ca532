"""HeaprMixtralForCausalLM: vLLM's MixtralForCausalLM with HEAPr-pruned routed experts.

Mixtral (per-expert tensors `block_sparse_moe.experts.{e}.w1/w3/w2`). Everything but the routed experts is the stock vLLM model; see vllm_ragged_moe.
"""

from vllm.model_executor.models import mixtral as _stock

from model_patches.vllm_ragged_moe import HeaprModelMixin


class HeaprMixtralForCausalLM(HeaprModelMixin, _stock.MixtralForCausalLM):
    heapr_stock_module = _stock
