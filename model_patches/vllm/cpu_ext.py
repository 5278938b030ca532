"""The native CPU op (`torch.ops.heapr_cpu.bucketed_moe`, csrc/bucketed_moe.cpp), built on first use.

Why native: vLLM compiles the CPU model with Dynamo (inductor, fullgraph), so stock vLLM's MoE runs
with no Python per step; a Python custom op for the bucket dispatch cost ~0.1-0.3 ms per layer per
step (sort, bincount + host sync, gather, per-bucket calls, index_add), which on a small model is
more than pruning saves. The C++ op does the same dispatch in one call and is opaque to Dynamo.

Built with torch's own extension tooling (`torch.utils.cpp_extension.load`, g++ and ninja, no
internet) into `TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions), once per machine and torch
version; `tools/setup.sh` builds it ahead of time. If the build fails (no compiler), `load()` returns
False, logs why once, and the layer falls back to the Python custom op (same output, slower).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).resolve().parent / "csrc" / "bucketed_moe.cpp"
_RAGGED_SOURCE = Path(__file__).resolve().parent / "csrc" / "ragged_moe_avx512.cpp"
_RAGGED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
log = logging.getLogger("vllm.heapr_serve")


def _register_fake() -> None:
    @torch.library.register_fake("heapr_cpu::bucketed_moe")
    def _fake(x, topk_weights, topk_ids, bucket_of, local_of, w13, w2, act, isa):
        return torch.empty_like(x)

    @torch.library.register_fake("heapr_cpu::zentorch_bucketed_moe")
    def _fake_zentorch(x, topk_weights, topk_ids, bucket_of, local_of, w13, w2, s13, s2, act):
        return torch.empty_like(x)

    @torch.library.register_fake("heapr_cpu::sliced_moe")
    def _fake_sliced(x, topk_weights, topk_ids, start, count, w13, w2, zero, act, isa):
        return torch.empty_like(x)


def _build(prefix: str, source: Path, cflags: list[str], ldflags: tuple[str, ...] = ()) -> None:
    """Compile and load one source with torch's cpp_extension; the name carries a hash of the source
    and flags, so an edited source or a changed flag never loads a stale build."""
    import hashlib

    from torch.utils.cpp_extension import load as build

    tag = hashlib.sha256(source.read_bytes() + " ".join([*cflags, *ldflags]).encode()).hexdigest()[:10]
    build(name=f"{prefix}_{tag}", sources=[str(source)], extra_cflags=cflags, extra_ldflags=list(ldflags),
          is_python_module=False, verbose=False)


def load() -> bool:
    """Build (first time) and load the op; True when `torch.ops.heapr_cpu.bucketed_moe` is usable."""
    with _LOCK:
        if "ok" in _STATE:
            return bool(_STATE["ok"])
        ok = False
        if os.environ.get("HEAPR_NO_CPU_EXT") != "1":
            try:
                import vllm._custom_ops  # noqa: F401  registers _C::cpu_fused_moe, which the op calls

                if not hasattr(torch.ops.heapr_cpu, "zentorch_bucketed_moe"):
                    _build("heapr_cpu", _SOURCE, ["-O3"])
                    _register_fake()
                ok = True
            except Exception as exc:  # no compiler, no ninja, headers missing: the Python path still works
                log.warning("heapr-serve: native CPU MoE op unavailable (%s); using the Python dispatch", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        _STATE["ok"] = ok
        return ok


@functools.cache
def cpu_has_ragged_isa() -> bool:
    """Whether this CPU runs the ragged kernel's instructions (AVX-512 with BF16 dot products); read
    once per process (every MoE layer asks when it is built)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return all(f in flags for f in _RAGGED_FLAGS)


def load_ragged() -> bool:
    """Build (first time) and load `torch.ops.heapr_cpu.ragged_moe`, the exact-width kernel; True when
    usable. Compiled for AVX-512 BF16 on its own, so the other op never carries those instructions."""
    with _LOCK:
        if "ragged" in _STATE:
            return bool(_STATE["ragged"])
        ok = False
        if os.environ.get("HEAPR_NO_CPU_EXT") != "1" and cpu_has_ragged_isa():
            try:
                if not hasattr(torch.ops.heapr_cpu, "ragged_moe"):
                    # -fopenmp: without it ATen's parallel_for is a plain loop (its OpenMP body is
                    # compiled only under _OPENMP) and the kernel would use one core; libgomp.so.1
                    # resolves to the copy torch has already loaded, so there is one thread pool
                    _build("heapr_cpu_ragged", _RAGGED_SOURCE,
                           ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"],
                           ("-fopenmp",))

                    @torch.library.register_fake("heapr_cpu::ragged_moe")
                    def _fake(x, topk_weights, topk_ids, widths, w13_off, w2_off, w13, w2, max_width):
                        return torch.empty_like(x)
                ok = True
            except Exception as exc:
                log.warning("heapr-serve: ragged CPU MoE kernel unavailable (%s); using vLLM's kernel",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        _STATE["ragged"] = ok
        return ok
