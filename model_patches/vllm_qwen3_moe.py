"""HeaprQwen3MoeForCausalLM: vLLM's Qwen3MoeForCausalLM with HEAPr-pruned routed experts.

Qwen3-MoE. Everything but the routed experts is the stock vLLM model; see vllm_ragged_moe.
"""

from vllm.model_executor.models import qwen3_moe as _stock

from model_patches.vllm_ragged_moe import HeaprModelMixin


class HeaprQwen3MoeForCausalLM(HeaprModelMixin, _stock.Qwen3MoeForCausalLM):
    heapr_stock_module = _stock
