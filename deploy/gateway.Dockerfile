# syntax=docker/dockerfile:1
# Image of the API gateway from billstream_localstack. In local mode it is the single entry
# point; in the containers and cluster modes the reverse proxy / Ingress routes the API itself
# and sends only /openapi.json and /docs here: the gateway serves the OpenAPI document merged
# from every service (BILLSTREAM_GATEWAY_UPSTREAMS, a JSON map service -> base URL).
#   docker build -f deploy/gateway.Dockerfile -t billstream/gateway .

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.8
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/opt/venv
RUN pip install "uv==${UV_VERSION}"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package billstream-localstack

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BILLSTREAM_GATEWAY_HOST=0.0.0.0 \
    BILLSTREAM_GATEWAY_PORT=8000
RUN groupadd --system --gid 10001 billstream \
    && useradd --system --uid 10001 --gid billstream --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin billstream
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["python", "-m", "billstream_localstack.gateway"]
