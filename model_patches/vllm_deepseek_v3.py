"""HeaprDeepseekV3ForCausalLM: vLLM's DeepseekV3ForCausalLM with HEAPr-pruned routed experts.

DeepSeek-V3 (MLA attention, grouped top-k routing and shared experts stay stock). Everything but the routed experts is the stock vLLM model; see vllm_ragged_moe.
"""

from vllm.model_executor.models import deepseek_v2 as _stock

from model_patches.vllm_ragged_moe import HeaprModelMixin


class HeaprDeepseekV3ForCausalLM(HeaprModelMixin, _stock.DeepseekV3ForCausalLM):
    heapr_stock_module = _stock
