"""Does a vLLM server batch concurrent requests? Waves of C concurrent streaming requests, one line per wave.

Why: on the 2-core CPU machine `heapr-serve bench` saw the dense and the pruned arm swing between
runs at concurrency 4 and 16. This probe takes the A/B client and the pruned model out of it: it
serves one folder (stock vLLM for a dense folder, the heapr plugin for a pruned one), sends waves of
`--concurrency` requests (distinct prompts of `--input-len` token ids, `--output-len` tokens, greedy,
streamed) and prints each wave's largest TTFT and end-to-end time. A server that batches the wave
finishes it in about one request's time; one that runs it request by request takes C times that.

  python -m tools.probe_batching examples/tiny-qwen3-moe --waves 40
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


async def _request(client, url: str, prompt: list[int], output_len: int) -> tuple[float, float]:
    body = {"model": "probe", "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "stream": True,
            "temperature": 0.0}
    start, first = time.perf_counter(), None
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("data:") and "[DONE]" not in line:
                first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - start, end - start


async def _waves(url: str, args) -> None:
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=args.concurrency * 2)) as client:
        for w in range(args.waves):
            prompts = [[5 + (i * 7 + j * 13 + w * 31) % 900 for i in range(args.input_len)] for j in range(args.concurrency)]
            t0 = time.perf_counter()
            times = await asyncio.gather(*(_request(client, url, p, args.output_len) for p in prompts))
            print(f"wave {w:3d}  {time.perf_counter() - t0:6.3f} s  max TTFT {max(t for t, _ in times) * 1e3:7.1f} ms  "
                  f"max E2E {max(e for _, e in times) * 1e3:7.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--waves", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    args = parser.parse_args()
    if not (args.folder / "config.json").is_file():
        sys.exit(f"error: {args.folder} has no config.json; pass a model folder")
    from heapr_serve.ab.local_vllm import LocalVllmServer

    log = Path(tempfile.mkdtemp(prefix="heapr-probe-")) / "server.log"
    server = LocalVllmServer(args.folder, served_name="probe", log=log, env={"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)})
    print(f"serving {args.folder} (log: {log}; its 'Running: N reqs' lines are the engine's own view)", flush=True)
    with server:
        asyncio.run(_waves(server.url, args))


if __name__ == "__main__":
    main()
