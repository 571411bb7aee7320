"""The engine versions kvstack is built and tested against; the Dockerfile pins the same ones."""

from __future__ import annotations

VLLM_VERSION = "0.24.0"
# The newest LMCache whose compiled ops load against vLLM 0.24's torch 2.11 (see the reference notes).
LMCACHE_VERSION = "0.5.3"
VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
