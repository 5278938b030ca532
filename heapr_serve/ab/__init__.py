"""Stage 7, A/B: the offline benchmark, the live traffic-splitting proxy, their Prometheus metrics,
and local vLLM servers."""
