"""The APIs vLLM serves beyond chat/completions/embeddings: OpenAI Responses, Anthropic Messages, tokenize."""
