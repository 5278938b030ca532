"""The guarded ramp of ab-proxy (`--ramp 5,25,50,100 --step-after N`): the pruned arm's share rises
one step each time it passes its checks, and falls to 0 at once when one fails.

A *window* is what the arms served since the last step: each request its own arm was assigned (the
failed-over ones never count), and the shadow comparisons when `--shadow-rate` is on. When B has
served `--step-after` requests in the window (and A at least a few, to compare with), the checks run:

- B's median end-to-end latency over A's at most `--slo-latency-ratio` (streams: also the median TTFT);
- B's error rate at most `--slo-error-rate` above A's;
- with shadow comparisons: the share of identical greedy answers at least `--slo-agreement`, and the
  mean log-likelihood gap per token at most `--slo-logprob-gap`.

All pass: the next step, and a new window. One fails: the share goes to 0 at once and stays there
(state "rolled_back"), and the reason names the check and its numbers. Errors do not wait for the
window: once B's failures alone exceed the error budget of a whole window, it rolls back. The state
is a metric (`heapr_ab_ramp_*`), a JSON document (`GET /ab/status`), and, with `--ramp-state FILE`,
a file written atomically on every change, from which a restarted proxy resumes.

`/ab/status` is also the proxy's report of the window's ratios, each with its 95% interval (`window_ratios`):
B/A median end-to-end latency and TTFT (a bootstrap over each arm's requests: live traffic is not paired),
and the shadow agreement (a Wilson interval); "no difference measured" where the interval holds 1.0.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from heapr_serve.errors import HeaprError

MIN_A = 5  # A's requests in a window, at least, for a ratio
DRAWS = 1000


def _median_ratio_interval(a: list[float], b: list[float], seed: int = 0) -> tuple[float, tuple[float, float] | None]:
    """B/A of the medians and its 95% percentile-bootstrap interval (each arm resampled on its own)."""
    import numpy as np

    ratio = statistics.median(b) / max(statistics.median(a), 1e-9)
    if len(a) < MIN_A or len(b) < MIN_A:
        return ratio, None
    rng = np.random.default_rng(seed)
    xa, xb = np.asarray(a), np.asarray(b)
    ma = np.median(xa[rng.integers(0, len(xa), (DRAWS, len(xa)))], axis=1)
    mb = np.median(xb[rng.integers(0, len(xb), (DRAWS, len(xb)))], axis=1)
    lo, hi = np.percentile(mb / np.maximum(ma, 1e-9), [2.5, 97.5])
    return ratio, (float(lo), float(hi))


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def window_ratios(w: "_Window") -> dict:
    """The window's B/A ratios with 95% intervals, and each one's reading."""
    out = {}
    for key, values in (("e2e_p50", w.e2e), ("ttft_p50", w.ttft)):
        if values["a"] and values["b"]:
            ratio, interval = _median_ratio_interval(values["a"], values["b"])
            verdict = ("too few requests for an interval" if interval is None else "no difference measured"
                       if interval[0] <= 1.0 <= interval[1] else "B faster" if interval[1] < 1.0 else "B slower")
            out[key] = {"ratio": ratio, "interval": interval, "reading": verdict, "requests": {"a": len(values["a"]), "b": len(values["b"])}}
    if w.shadow_pairs:
        out["shadow_agreement"] = {"share": w.shadow_matches / w.shadow_pairs, "interval": _wilson(w.shadow_matches, w.shadow_pairs),
                                   "pairs": w.shadow_pairs}
    return out


@dataclass
class RampChecks:
    latency_ratio: float = 1.25
    error_rate: float = 0.01
    agreement: float = 0.0  # (0: not checked) share of identical greedy answers, with --shadow-rate
    logprob_gap: float = float("inf")  # mean |log-prob difference| per token, with --shadow-rate


@dataclass
class _Window:
    e2e: dict = field(default_factory=lambda: {"a": [], "b": []})
    ttft: dict = field(default_factory=lambda: {"a": [], "b": []})
    requests: dict = field(default_factory=lambda: {"a": 0, "b": 0})
    errors: dict = field(default_factory=lambda: {"a": 0, "b": 0})
    shadow_pairs: int = 0
    shadow_matches: int = 0
    gaps: list = field(default_factory=list)


class Ramp:
    def __init__(self, steps: list[float], step_after: int, checks: RampChecks, state_file: Path | None = None,
                 metrics=None) -> None:
        self.steps, self.step_after, self.checks, self.state_file, self.metrics = steps, step_after, checks, state_file, metrics
        self.step, self.state, self.reason, self.changed_at = 0, "ramping", "started", time.time()
        self.window = _Window()
        if state_file is not None and state_file.is_file():
            self._resume(state_file)
        self._publish()

    # --- the split's share ---

    def share(self) -> float:
        return 0.0 if self.state == "rolled_back" else self.steps[self.step] / 100.0

    # --- what the arms served ---

    def record(self, arm: str, ok: bool, e2e: float | None, ttft: float | None) -> None:
        """One request its own arm was assigned (failed-over ones never come here)."""
        if self.state != "ramping":
            return
        w = self.window
        w.requests[arm] += 1
        if not ok:
            w.errors[arm] += 1
        if ok and e2e is not None:
            w.e2e[arm].append(e2e)
            if ttft is not None:
                w.ttft[arm].append(ttft)
        budget = self.checks.error_rate * self.step_after
        if arm == "b" and w.errors["b"] > max(budget, 0) and w.errors["b"] >= 3:
            self._roll_back(f"error rate: B failed {w.errors['b']} of {w.requests['b']} requests in this window, "
                            f"more than --slo-error-rate {self.checks.error_rate:g} allows in a whole window of {self.step_after}")
            return
        self._maybe_step()

    def record_shadow(self, match: bool, gap: float | None) -> None:
        if self.state != "ramping":
            return
        self.window.shadow_pairs += 1
        self.window.shadow_matches += bool(match)
        if gap is not None:
            self.window.gaps.append(gap)

    # --- decisions ---

    def _maybe_step(self) -> None:
        w = self.window
        if w.requests["b"] < self.step_after or w.requests["a"] < MIN_A and self.steps[self.step] < 100:
            return
        failed = self._failed_check()
        if failed:
            self._roll_back(failed)
            return
        if self.step + 1 < len(self.steps):
            self._change(self.step + 1, "ramping", f"step {self.step + 1} passed its checks")
        else:
            self._change(self.step, "complete", f"the last step ({self.steps[self.step]:g}%) passed its checks")

    def _failed_check(self) -> str | None:
        c, w = self.checks, self.window
        for name, values in (("end-to-end latency", w.e2e), ("TTFT", w.ttft)):
            if values["a"] and values["b"]:
                ratio = statistics.median(values["b"]) / max(statistics.median(values["a"]), 1e-9)
                if ratio > c.latency_ratio:
                    return f"latency: B's median {name} is {ratio:.2f}x A's (--slo-latency-ratio {c.latency_ratio:g})"
            elif name == "end-to-end latency" and not values["b"]:
                return "latency: B completed no request in this window"
        rate = {arm: w.errors[arm] / w.requests[arm] if w.requests[arm] else 0.0 for arm in ("a", "b")}
        if rate["b"] - rate["a"] > c.error_rate:
            return f"error rate: B {rate['b']:.1%} against A {rate['a']:.1%} (--slo-error-rate {c.error_rate:g})"
        if w.shadow_pairs:
            agreement = w.shadow_matches / w.shadow_pairs
            if agreement < c.agreement:
                return f"agreement: {agreement:.0%} of {w.shadow_pairs} shadow pairs identical (--slo-agreement {c.agreement:g})"
            if w.gaps and statistics.fmean(w.gaps) > c.logprob_gap:
                return (f"log-likelihood gap: {statistics.fmean(w.gaps):.3f} nats per token over {len(w.gaps)} shadow pairs "
                        f"(--slo-logprob-gap {c.logprob_gap:g})")
        elif c.agreement > 0 or c.logprob_gap < float("inf"):
            return "agreement: no shadow comparison in this window (is --shadow-rate on?)"
        return None

    def _roll_back(self, reason: str) -> None:
        self._change(self.step, "rolled_back", reason)
        print(f"ab-proxy: ramp rolled back, B's share is 0: {reason}", file=sys.stderr, flush=True)

    def _change(self, step: int, state: str, reason: str) -> None:
        self.step, self.state, self.reason, self.changed_at = step, state, reason, time.time()
        self.window = _Window()
        self._save()
        self._publish()

    # --- what it shows ---

    def status(self) -> dict:
        w = self.window
        return {"state": self.state, "step": self.step, "steps": self.steps, "share_b": self.share(),
                "step_after": self.step_after, "checks": {k: (None if v == float("inf") else v) for k, v in asdict(self.checks).items()},
                "last_change": {"reason": self.reason, "at": self.changed_at},
                "window": {"requests": dict(w.requests), "errors": dict(w.errors), "shadow_pairs": w.shadow_pairs,
                           "ratios": window_ratios(w)}}

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.ramp_share.set(self.share())
            self.metrics.ramp_step.set(self.step)
            for state in ("ramping", "complete", "rolled_back"):
                self.metrics.ramp_state.labels(state).set(1 if state == self.state else 0)

    def _save(self) -> None:
        if self.state_file is None:
            return
        record = {"steps": self.steps, "step": self.step, "state": self.state, "reason": self.reason, "at": self.changed_at}
        partial = self.state_file.with_name(f".{self.state_file.name}.partial")
        partial.write_text(json.dumps(record) + "\n")
        os.replace(partial, self.state_file)

    def _resume(self, state_file: Path) -> None:
        try:
            record = json.loads(state_file.read_text())
            steps, step, state = record["steps"], int(record["step"]), str(record["state"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise HeaprError(f"--ramp-state {state_file}: not a ramp state this proxy wrote ({err}); remove it to start over") from None
        if steps != self.steps or not 0 <= step < len(steps) or state not in ("ramping", "complete", "rolled_back"):
            raise HeaprError(f"--ramp-state {state_file}: records steps {steps}, not --ramp {','.join(f'{s:g}' for s in self.steps)}; "
                             "remove it to start a new ramp")
        self.step, self.state, self.reason = step, state, f"resumed from {state_file}: {record.get('reason', '')}"
        self.changed_at = float(record.get("at") or time.time())


def parse_steps(text: str) -> list[float]:
    """`--ramp 5,25,50,100`: increasing percentages ending at 100."""
    try:
        steps = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HeaprError(f"--ramp {text!r}: give increasing percentages, e.g. 5,25,50,100") from None
    if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)):
        raise HeaprError(f"--ramp {text!r}: give increasing percentages in (0, 100], e.g. 5,25,50,100")
    return steps
