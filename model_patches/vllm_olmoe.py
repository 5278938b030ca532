"""HeaprOlmoeForCausalLM: vLLM's OlmoeForCausalLM with HEAPr-pruned routed experts.

OLMoE. Everything but the routed experts is the stock vLLM model; see vllm_ragged_moe.
"""

from vllm.model_executor.models import olmoe as _stock

from model_patches.vllm_ragged_moe import HeaprModelMixin


class HeaprOlmoeForCausalLM(HeaprModelMixin, _stock.OlmoeForCausalLM):
    heapr_stock_module = _stock
