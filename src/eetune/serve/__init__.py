"""Deployment of tuned exits: `eetune export` (a standalone draft model for vLLM, SGLang, llama.cpp
and transformers) and `eetune serve` (an OpenAI-compatible server with continuous batching)."""
