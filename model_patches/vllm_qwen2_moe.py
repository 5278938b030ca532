"""HeaprQwen2MoeForCausalLM: vLLM's Qwen2MoeForCausalLM with HEAPr-pruned routed experts.

Qwen2-MoE (Qwen1.5-MoE); its shared expert and shared_expert_gate stay stock. Everything but the routed experts is the stock vLLM model; see vllm_ragged_moe.
"""

from vllm.model_executor.models import qwen2_moe as _stock

from model_patches.vllm_ragged_moe import HeaprModelMixin


class HeaprQwen2MoeForCausalLM(HeaprModelMixin, _stock.Qwen2MoeForCausalLM):
    heapr_stock_module = _stock
