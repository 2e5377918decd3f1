# The LSTM trainer: fits one speaker's audio-to-mouth-shape model and exports a SavedModel.
# Runs `python -m services.lipsync.trainer` (one training, then exit); the same image also starts the
# trainer as a gRPC service, `python -m services.lipsync.trainer_service` (lipsync.v1.TrainerService).
# Build from the repository root (the build context must be the repository):
#   docker build -f deploy/docker/trainer.Dockerfile -t audio2video/trainer .
# It runs as a Kubernetes Job (k8s/base/trainer.yaml) or, with the service's entry point, as the compose
# `trainer` service, and writes <speaker>/<version>/saved_model.pb under A2V_MODELS_DIR, the folder TF
# Serving loads from.
# TENSORFLOW_EXTRAS=[and-cuda] adds the CUDA wheels; pass an empty value for a CPU-only image.

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
COPY requirements.txt requirements-tf.txt ./
ARG TENSORFLOW_EXTRAS="[and-cuda]"
# One resolve with requirements.txt, so TensorFlow cannot move the pinned numpy or protobuf.
RUN python -m venv /opt/venv \
    && tensorflow="$(sed -n 's/^tensorflow==//p' requirements-tf.txt)" \
    && /opt/venv/bin/pip install -r requirements.txt "tensorflow${TENSORFLOW_EXTRAS}==${tensorflow}"

# -- runtime: the venv, the stubs and only the code this image runs ---------------------------------
FROM python:3.11-slim
# Unbuffered logs; no .pyc writes (the root filesystem is read-only where it runs); caches in /tmp.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/app \
    PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/tmp/.cache \
    A2V_MODELS_DIR=/models
RUN groupadd --system --gid 10001 a2v \
    && useradd --system --uid 10001 --gid a2v --home-dir /app --no-create-home --shell /usr/sbin/nologin a2v \
    && mkdir /models && chown 10001:10001 /models
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY --from=builder /src/audio2video/ audio2video/
COPY services/__init__.py services/
COPY services/runtime/ services/runtime/
COPY services/lipsync/ services/lipsync/
# The gRPC health check that compose runs against the trainer service.
COPY deploy/__init__.py deploy/healthcheck.py deploy/
RUN python -m compileall -q /app
USER 10001:10001
ENTRYPOINT ["python", "-m", "services.lipsync.trainer"]
