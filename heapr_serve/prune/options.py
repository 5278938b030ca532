"""`PruneOptions`: what a pruning run is asked to do, checked once when it is made.

The ratio and every setting of the pruning travel together from where they are given (the `compress`
and `apply` flags, heapr_serve.prune.flags; the llm-compressor modifier's fields) to the plan, the
re-fit, healing, the writer and the quantizer. Checking them when the object is made means a bad value
is refused in a millisecond, before any model is loaded, and nothing downstream checks them again.
Healing's and quantizing's own options (`HealOptions`, `QuantizeOptions`) are held as they are; the
calibration run's settings (dtype, device, batches, streaming) are `RunOptions` (heapr_serve.score.run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from heapr_serve.errors import HeaprError
from heapr_serve.families import family_for
from heapr_serve.prune.allocation import check_allocation_options
from heapr_serve.prune.methods import get_method
from heapr_serve.prune.reconstruct import DEFAULT_DAMP, INPUTS

if TYPE_CHECKING:  # held, not built here: the llm-compressor modifier imports this module without healing's or quantizing's code
    from heapr_serve.prune.heal import HealOptions
    from heapr_serve.quantize.options import QuantizeOptions


@dataclass(frozen=True)
class PruneOptions:
    ratio: float  # share of routed-expert neurons removed
    method: str = "heapr"
    scope: str = "global"
    align: int = 1
    keep_unrouted: bool = False
    seed: int = 0  # --method random's
    drop_mtp: bool = False
    overwrite: bool = False
    reconstruct: bool = False  # re-fit the kept down-projection columns (the flags leave it off for whole-expert methods)
    reconstruct_inputs: str = "pruned"
    reconstruct_damp: float = DEFAULT_DAMP
    heal: HealOptions | None = None
    quantize: QuantizeOptions | None = None

    def __post_init__(self) -> None:
        get_method(self.method)
        check_allocation_options(self.ratio, self.scope, self.align)
        if self.reconstruct_inputs not in INPUTS:
            raise HeaprError(f"--reconstruct-inputs {self.reconstruct_inputs!r}: use one of {', '.join(INPUTS)}")
        if not (self.reconstruct_damp > 0 and self.reconstruct_damp < 1e6):
            raise HeaprError(f"--reconstruct-damp must be a positive number (got {self.reconstruct_damp}); {DEFAULT_DAMP:g} is the default")
        if self.heal is not None:
            self.heal.check()
            if self.reconstruct_inputs != "pruned":
                raise HeaprError("--heal runs layer by layer on the pruned model's own inputs; drop --reconstruct-inputs dense")
        if self.quantize is not None:
            self.quantize.check()

    @property
    def retunes(self) -> bool:
        """Whether kept weights get new values (--reconstruct or --heal), which needs the calibration tokens."""
        return self.reconstruct or self.heal is not None

    @property
    def output_copies(self) -> int:
        """How many pruned folders the disk must hold: with --quantize, a scratch one beside the output."""
        return 1 if self.quantize is None else 2

    def check_layout(self, config: dict) -> None:
        """--reconstruct and --heal change bias-free experts; gpt-oss's experts have biases."""
        if self.retunes and family_for(config).expert_layout != "standard":
            flag = "--heal" if self.heal is not None else "--reconstruct"
            raise HeaprError(f"{flag} is not supported for {config['model_type']} yet (expert biases); drop {flag}")

    def heal_identity(self) -> dict:
        """What healed layers saved for --resume must have been healed with."""
        return {"heal": None if self.heal is None else self.heal.record(), "method": self.method, "ratio": self.ratio,
                "scope": self.scope, "align": self.align, "keep_unrouted": self.keep_unrouted, "reconstruct": self.reconstruct,
                "damp": self.reconstruct_damp}
