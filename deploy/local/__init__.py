"""The local CPU stack: real vLLM engines (engines.py), the gateway (stack.py), the scale-out stack (scaleout.py)."""
