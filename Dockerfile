# bandgate gateway image: `docker build -t bandgate .` then
#   docker run -p 50051:50051 -p 50052:50052 -v bandgate-data:/data -e BANDGATE_SERVER_NAMES=gw.example.com bandgate
# Mutual TLS on 50051, bearer tokens over TLS on 50052; plaintext health stays on the container's loopback
# (50050) for the HEALTHCHECK. The first start makes a development CA, the server certificate and the
# operator credential in /data/state (on the volume: they outlive the container); docs/security.md says
# how to mount a real PKI instead.
# The builder installs the project and its pinned dependencies into a venv; the runtime stage gets only
# that venv (no compiler, no pip cache, no sources) and runs as a non-root user. tests/test_dockerfile.py
# runs these same install and start commands in a fresh venv, since CI has no Docker engine.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY decoder ./decoder
COPY gateway ./gateway
COPY bench ./bench
RUN pip install /src

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 bandgate \
 && useradd --system --uid 10001 --gid bandgate --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin bandgate \
 && mkdir -p /data /var/cache/bandgate/numba \
 && chown bandgate:bandgate /data /var/cache/bandgate/numba
COPY --from=builder /opt/venv /opt/venv
# The Numba cache lives outside the (root-owned) venv, in a directory the gateway's user can write.
# BANDGATE_TOKEN_PROCESS: token callers (phones, consumers) in a serving process of their own, so that a
# flood of bad tokens on 50052 cannot starve the bands' acks on 50051 (docs/security.md, "Hostile peers").
ENV PATH=/opt/venv/bin:$PATH \
    NUMBA_CACHE_DIR=/var/cache/bandgate/numba \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BANDGATE_STATE_DIR=/data/state \
    BANDGATE_TOKEN_PROCESS=true
USER bandgate:bandgate
# Compile every kernel now, as the runtime user, against the installed sources (Numba's cache is keyed
# by source path and mtime): the container serves its first batch without ~45 s of JIT compilation.
# The cache is for this build machine's CPU; on another CPU model Numba recompiles on first use.
RUN bandgate warm
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50051 50052
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["bandgate", "health", "--target", "127.0.0.1:50050"]
STOPSIGNAL SIGTERM
CMD ["bandgate", "serve", "--listen", "0.0.0.0:50051", "--token-listen", "0.0.0.0:50052", \
     "--health-listen", "127.0.0.1:50050", "--store", "sqlite:////data/bandgate.db"]
