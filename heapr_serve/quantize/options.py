"""`--quantize`'s options (scheme, method, group), checked before any model is read.

Their own module, apart from the quantize stage (heapr_serve.quantize.after_pruning), so that the
command line can check them without importing compressed-tensors (~8 s on 2 cores): that happens
only when a checkpoint is quantized, or a group size must be checked against a scheme.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from heapr_serve.errors import HeaprError
from heapr_serve.quantize.schemes import SCHEMES, scheme_for

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantizeOptions:
    scheme: str
    method: str = "gptq"
    group_size: int | None = None

    def check(self) -> None:
        """A bad scheme, method or group is refused in one line, before any model is read."""
        if self.scheme not in SCHEMES:
            raise HeaprError(f"--quantize {self.scheme!r}: unknown scheme; choose one of {', '.join(SCHEMES)}")
        if self.method not in METHODS:
            raise HeaprError(f"--quant-method {self.method!r}: use gptq (calibrated, the default) or rtn (round to nearest)")
        if self.group_size is None:
            return  # the preset's own group: nothing to check (and compressed-tensors need not be imported)
        try:
            scheme_for(self.scheme).build(self.group_size)
        except HeaprError as err:
            raise HeaprError(str(err).replace("--group-size", "--quant-group-size")) from None

    def resolve(self, source: Path, align: int, hidden: int, dense_width: int) -> tuple["QuantizeOptions", int]:
        """(these options with the group decided, the --align pruning must use). Kept widths are the
        input width of every expert's down projection, so they must hold whole groups: with --align 1
        (the default) the widths are rounded to the group; a group that does not fit is refused."""
        from heapr_serve.checkpoint.format import PER_EXPERT_TENSOR
        from heapr_serve.quantize.folder import DEFAULT_IGNORE, is_linear_weight, plan_tensors
        from heapr_serve.quantize.rtn import alignment_unit

        spec = scheme_for(self.scheme)
        _, _, shapes = plan_tensors(source, [re.compile(p) for p in DEFAULT_IGNORE])
        dims = {s[1] for n, s in shapes.items() if is_linear_weight(n, s) and not _is_expert_down(PER_EXPERT_TENSOR.match(n))}
        dims |= {hidden, dense_width} | ({align} if align > 1 else set())
        # at least 4 width steps per expert: a group as wide as the expert would make pruning drop whole experts
        group = self.group_size if self.group_size is not None else spec.fitting_group(sorted(dims), at_most=max(8, dense_width // 4))
        unit = alignment_unit(spec.build(group))[1]
        if unit > 1 and align > 1 and align % unit:
            raise HeaprError(f"--quantize {self.scheme}: groups of {unit} along each expert's input need kept widths in multiples of "
                             f"{unit}; pass --align {unit}, or a --quant-group-size that divides --align {align} (-1: per channel)")
        if unit > 1 and dense_width % unit:
            raise HeaprError(f"--quant-group-size {group}: does not divide the experts' width {dense_width}; pass one that does (-1: per channel)")
        return QuantizeOptions(self.scheme, self.method, group), max(align, unit)


def _is_expert_down(m) -> bool:
    return m is not None and m["proj"] in ("down_proj", "w2")
