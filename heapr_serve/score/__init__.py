"""Stage 2, score: the instrumented MoE forward, observers, statistics, and the calibration pass."""
