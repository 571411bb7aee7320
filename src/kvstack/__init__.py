"""kvstack: a Kubernetes production stack for serving LLMs with vLLM and LMCache."""

__version__ = "0.1.0"
