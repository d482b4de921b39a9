# syntax=docker/dockerfile:1
# OpenAI-compatible gateway for vLLM.
#   docker build -t vllm-gateway:0.1.0 .
#   docker run -p 8000:8000 -v $PWD/deploy/examples/single-vllm.yaml:/etc/gateway/gateway.yaml:ro \
#       -e VLLM_URL=http://host.docker.internal:8001 -e VLLM_MODEL=my-model vllm-gateway:0.1.0
# The config is read from /etc/gateway/gateway.yaml; GATEWAY_WORKERS sets the uvicorn worker count (default 2).

# ---- build: install the package (and its dependencies) from pyproject.toml into a venv
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
COPY gateway ./gateway
RUN /opt/venv/bin/pip install .

# ---- runtime: the venv only, run as an unprivileged user
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_WORKERS=2 \
    GATEWAY_STATE_DIR=/var/lib/gateway
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent gateway \
    && mkdir -p /etc/gateway /var/lib/gateway && chown gateway:gateway /var/lib/gateway
# Without redis.url the ledger is a SQLite file here; with it, the spool (what waits for Redis during an
# outage): mount a volume on it to keep billing data.
VOLUME /var/lib/gateway
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# python:3.11-slim has no curl: probe /healthz with the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Shell form through `sh -c` so ${GATEWAY_WORKERS} is expanded; `exec` keeps the gateway as PID 1 (gets SIGTERM).
CMD ["sh", "-c", "exec gateway serve --config /etc/gateway/gateway.yaml --host 0.0.0.0 --port 8000 --workers ${GATEWAY_WORKERS:-2}"]
