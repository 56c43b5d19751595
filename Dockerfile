# CPU image that serves the chat (`make chat`) on port 7860.
# GPU: docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 ...
#      (then install a CUDA build of torch in place of the pinned CPU wheel).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

RUN apt-get update && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY pipeline pipeline
COPY service service
COPY configs configs
COPY data data
# the trained adapters (and their dev-split refusal curve and copy selector) the first chat serves
COPY adapters adapters
# The CPU wheel of torch, so pip does not pull a multi-GB CUDA build.
RUN python -m venv .venv \
    && .venv/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && make setup
EXPOSE 7860
# Binds to all interfaces inside the container; publish with -p 127.0.0.1:7860:7860.
CMD ["make", "chat", "ARGS=--host 0.0.0.0"]
