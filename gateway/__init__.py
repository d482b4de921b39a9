"""An OpenAI-compatible gateway for vLLM that accounts every request's latency, tokens and cost."""
