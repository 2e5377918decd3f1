# The retiming stage: re-times the target video to the new speech.
# Runs `python -m services.retiming` on port 50056 (A2V_RETIMING_ADDR in deploy/.env), as the local stack does.
# Build from the repository root (the build context must be the repository):
#   docker build -f deploy/docker/retiming.Dockerfile -t audio2video/retiming .

# -- builder: the virtualenv with the pinned requirements, and the gRPC stubs --------------------
FROM python:3.11-slim AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY requirements-dev.txt ./
# grpcio-tools (pinned in requirements-dev.txt) stays in this stage, in a venv of its own.
RUN python -m venv /opt/protoc \
    && /opt/protoc/bin/pip install "$(grep -E '^grpcio-tools==' requirements-dev.txt)"
COPY proto/ proto/
# The same stubs as `make proto`.
RUN find proto -name '*.proto' -print0 | sort -z \
    | xargs -0 /opt/protoc/bin/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
    && find audio2video -type d -exec touch {}/__init__.py \;
COPY requirements.txt ./
RUN python -m venv /opt/venv && /opt/venv/bin/pip install -r requirements.txt

# -- runtime: the venv, the stubs and only the code this image runs ---------------------------------
FROM python:3.11-slim
# Unbuffered logs; no .pyc writes (the root filesystem is read-only where it runs); caches in /tmp.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/app \
    PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/tmp/.cache \
    A2V_LISTEN=0.0.0.0:50056
RUN groupadd --system --gid 10001 a2v \
    && useradd --system --uid 10001 --gid a2v --home-dir /app --no-create-home --shell /usr/sbin/nologin a2v
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY --from=builder /src/audio2video/ audio2video/
COPY services/__init__.py services/
COPY services/runtime/ services/runtime/
COPY services/retiming/ services/retiming/
COPY deploy/__init__.py deploy/healthcheck.py deploy/
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 50056
# Compose and Kubernetes run their own gRPC checks; this one serves a plain `docker run`.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "deploy.healthcheck", "audio2video.retiming.v1.RetimingService"]
ENTRYPOINT ["python", "-m", "services.retiming"]
