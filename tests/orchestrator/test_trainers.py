"""Where TrainSpeaker's trainer runs: the command line, its output, the Kubernetes Job made from the template, and
the trainer service through a real gRPC server."""

import re
import threading
import uuid

import kubernetes_validate
import pytest

from audio2video.common.v1 import common_pb2
from audio2video.face.v1 import face_pb2
from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from orchestrator.pipeline import Pipeline, Reporter, Stage, StageFailed
from orchestrator.trainers import (
    GrpcTrainer,
    LocalTrainer,
    TrainerRun,
    TrainSpec,
    follow_output,
    job_from_template,
    job_name,
    trainer_arguments,
    trainer_from_env,
)
from services.face.dataset import build_speaker_dataset
from services.lipsync import trainer as lipsync_trainer
from services.lipsync.trainer_service import TrainerServicer
from services.lipsync.versions import stored_versions
from services.runtime.config import ConfigError
from services.runtime.errors import CallFailed, Cancelled, FailedPrecondition, Unavailable
from services.runtime.server import binding_for
from tests.conftest import free_port, wait_until
from tests.deploy.test_manifests import K8S_VERSION, OVERLAYS, find, rendered
from tests.lipsync.test_trainer import TINY, clip, upload

ARGUMENTS = trainer_arguments(
    "obama", "datasets/obama/x.npz", "datasets/obama/pca.npz", {"batch_size": 10, "max_epochs": 300}, "/models"
)
SPEC = TrainSpec(
    "obama",
    common_pb2.ObjectRef(key="datasets/obama/x.npz"),
    common_pb2.ObjectRef(key="datasets/obama/pca.npz"),
    lipsync_pb2.TrainingOptions(max_epochs=300, batch_size=10),
    "/models",
)


def test_arguments_name_the_data_and_the_settings_as_the_trainer_spells_them():
    assert ARGUMENTS == [
        "--speaker", "obama", "--dataset", "datasets/obama/x.npz", "--pca", "datasets/obama/pca.npz",
        "--models-dir", "/models", "--batch-size", "10", "--epochs", "300",
    ]  # fmt: skip


def test_a_spec_gives_the_same_command_line_and_the_services_request():
    assert SPEC.arguments() == ARGUMENTS
    request = SPEC.request("r1")
    assert (request.speaker, request.dataset.key, request.pca.key) == ("obama", "datasets/obama/x.npz", SPEC.pca.key)
    assert request.options == SPEC.options and request.request_id == "r1"
    assert TrainSpec("a", SPEC.dataset, SPEC.pca).arguments() == ["--speaker", "a", "--dataset", SPEC.dataset.key,
                                                                  "--pca", SPEC.pca.key]  # fmt: skip


def test_output_reports_epochs_and_the_stored_model():
    epochs = []
    lines = ["loading", "epoch 1/3  train 0.1", "epoch 2/3  train 0.05", "stored models/obama/4/ (3 epochs)\n"]
    run = follow_output(lines, lambda done, total: epochs.append((done, total)))
    assert epochs == [(1, 3), (2, 3)]
    assert run.prefix == "models/obama/4/" and run.summary.startswith("stored models/obama/4/")


def test_output_without_a_model_fails_with_the_trainers_own_error():
    with pytest.raises(FailedPrecondition, match="training failed: trainer: error: dataset not found"):
        follow_output(["epoch 1/3", "trainer: error: dataset not found", "bye"], None)
    with pytest.raises(FailedPrecondition, match="without storing a model"):
        follow_output([], None)


def test_a_local_trainer_that_cannot_start_says_why(tmp_path):
    environ = {"PATH": "/usr/bin:/bin", "A2V_S3_ENDPOINT": "127.0.0.1:1"}  # no credentials
    with pytest.raises(FailedPrecondition, match="A2V_S3_ACCESS_KEY"):
        LocalTrainer(environ=environ).run(SPEC, on_epoch=None, stop=None)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_job_comes_from_the_overlays_template_and_validates(overlay):
    template = find(rendered(overlay), "CronJob", "trainer")
    name = job_name("obama", ARGUMENTS)
    job = job_from_template(template, name, "obama", ARGUMENTS)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    assert job["metadata"]["namespace"] == template["metadata"]["namespace"]
    pod = job["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "trainer"]
    assert container["args"] == ARGUMENTS
    assert [e["value"] for e in container["env"] if e["name"] == "A2V_TRAIN_SPEAKER"] == ["obama"]
    assert container["image"] == template["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert job["spec"]["template"]["metadata"]["labels"]["audio2video/speaker"] == "obama"
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == (overlay == "gpu")
    # The template itself is untouched (it is the CronJob's).
    assert "args" not in template["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert "audio2video/job-id" not in job["metadata"]["labels"]  # trained for no orchestrator job
    owned = job_from_template(template, name, "obama", ARGUMENTS, owner="0123456789abcdef0123")
    kubernetes_validate.validate(owned, K8S_VERSION, strict=True)
    for labels in (owned["metadata"]["labels"], owned["spec"]["template"]["metadata"]["labels"]):
        assert labels["audio2video/job-id"] == "0123456789abcdef0123"  # the Job and its pod, found by the job
    (owned_container,) = [c for c in owned["spec"]["template"]["spec"]["containers"] if c["name"] == "trainer"]
    assert [e["value"] for e in owned_container["env"] if e["name"] == "A2V_JOB_ID"] == ["0123456789abcdef0123"]


def test_job_names_differ_per_run_and_fit_dns_labels():
    long_name = job_name("a_very_long_speaker_name_with_underscores_" * 2, ARGUMENTS)
    assert len(long_name) <= 63 and "_" not in long_name
    assert job_name("obama", ARGUMENTS) != job_name("obama", [*ARGUMENTS, "--seed", "2"])


def test_the_trainer_is_chosen_by_the_environment(tmp_path):
    assert isinstance(trainer_from_env({}), LocalTrainer)
    with pytest.raises(ConfigError, match="A2V_NAMESPACE"):
        trainer_from_env({"A2V_TRAINER": "kubernetes"})
    grpc_trainer = trainer_from_env({"A2V_TRAINER": "grpc", "A2V_TRAINER_ADDR": "trainer:50058"})
    assert isinstance(grpc_trainer, GrpcTrainer) and grpc_trainer.address == "trainer:50058"
    grpc_trainer.close()
    with pytest.raises(ConfigError, match="A2V_TRAINER_ADDR"):
        trainer_from_env({"A2V_TRAINER": "grpc"})
    with pytest.raises(ConfigError, match="local, kubernetes, grpc"):
        trainer_from_env({"A2V_TRAINER": "docker"})


def test_kubernetes_without_cluster_credentials_is_a_configuration_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="no cluster credentials"):
        trainer_from_env({"A2V_TRAINER": "kubernetes", "A2V_NAMESPACE": "audio2video"})


class FakeCluster:
    """The Kubernetes API as the KubernetesTrainer uses it: the CronJob, Jobs by name (409 on a second create),
    their pods and logs. A Job's pod prints `lines` and the Job then has `outcome` ("succeeded" or "failed")."""

    def __init__(self, template: dict, lines: list[str]) -> None:
        from types import SimpleNamespace

        self.ns, self.template, self.lines = SimpleNamespace, template, lines
        self.jobs: dict[str, dict] = {}
        self.outcome: dict[str, str] = {}
        self.api_client = self.ns(sanitize_for_serialization=lambda obj: obj)

    def read_namespaced_cron_job(self, name, namespace):
        return self.template

    def create_namespaced_job(self, namespace, body):
        from kubernetes.client.exceptions import ApiException

        if body["metadata"]["name"] in self.jobs:
            raise ApiException(status=409, reason="AlreadyExists")
        self.jobs[body["metadata"]["name"]] = body
        self.outcome.setdefault(body["metadata"]["name"], "succeeded")

    def read_namespaced_job_status(self, name, namespace):
        done = self.outcome[name]
        return self.ns(status=self.ns(active=0, succeeded=int(done == "succeeded"), failed=int(done == "failed")))

    def list_namespaced_pod(self, namespace, label_selector):
        name = label_selector.removeprefix("job-name=")
        pods = [self.ns(metadata=self.ns(name=f"{name}-pod"), status=self.ns(phase="Succeeded"))]
        return self.ns(items=pods if name in self.jobs else [])

    def read_namespaced_pod_log(self, pod, namespace, **kwargs):
        return self.ns(stream=lambda size: iter(["\n".join(self.lines).encode()]))


def kubernetes_trainer(cluster: FakeCluster):
    from kubernetes.client.exceptions import ApiException

    from orchestrator.trainers import KubernetesTrainer

    trainer = object.__new__(KubernetesTrainer)  # no cluster credentials here: the API is the fake's
    trainer.namespace, trainer.template, trainer.poll_seconds = "audio2video", "trainer", 0.01
    trainer.batch, trainer.core, trainer.api_exception = cluster, cluster, ApiException
    return trainer


def test_a_replica_taking_a_training_job_over_follows_the_trainer_job_its_dead_owner_started():
    from services.runtime.telemetry import correlation

    cluster = FakeCluster(find(rendered("dev"), "CronJob", "trainer"), ["epoch 1/1", "stored models/obama/4/ (1)"])
    with correlation(job_id="job0123456789abcdef"):
        first = kubernetes_trainer(cluster).run(SPEC, on_epoch=None, stop=None)
        taken_over = kubernetes_trainer(cluster).run(SPEC, on_epoch=None, stop=None)  # another replica, same job
    assert first.prefix == taken_over.prefix == "models/obama/4/"
    (name,) = cluster.jobs  # one training, not two
    job = cluster.jobs[name]
    assert job["metadata"]["labels"]["audio2video/job-id"] == "job0123456789abcdef"
    assert job["spec"]["template"]["metadata"]["labels"]["audio2video/job-id"] == "job0123456789abcdef"
    (container,) = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "trainer"]
    assert {"name": "A2V_JOB_ID", "value": "job0123456789abcdef"} in container["env"]
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)

    # That trainer Job failed: a retry of the job starts a new one beside it (the failed one stays to be read).
    cluster.outcome[name] = "failed"
    with correlation(job_id="job0123456789abcdef"):
        kubernetes_trainer(cluster).run(SPEC, on_epoch=None, stop=None)
    assert len(cluster.jobs) == 2 and all(len(n) <= 63 for n in cluster.jobs)
    # Another job training the same data gets its own trainer Job.
    with correlation(job_id="another"):
        kubernetes_trainer(cluster).run(SPEC, on_epoch=None, stop=None)
    assert len(cluster.jobs) == 3


# -- the pipeline's side --------------------------------------------------------------------------------


class RecordingTrainer:
    """Remembers the spec; then stores `run` or raises `error`."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.specs = error, []

    def run(self, spec, *, on_epoch, stop):
        self.specs.append(spec)
        if self.error is not None:
            raise self.error
        on_epoch(1, 1)
        return TrainerRun("models/obama/3/", "stored models/obama/3/  epochs 1")


def run_pipeline_trainer(trainer, training: lipsync_pb2.TrainingOptions) -> dict:
    dataset = face_pb2.BuildSpeakerDatasetResult(dataset=SPEC.dataset, pca=SPEC.pca)
    pipeline = Pipeline(None, models_dir="/models", trainer=trainer)
    return pipeline._run_trainer("obama", dataset, training, report=Reporter(), stop=None)


def test_the_pipeline_sends_only_the_jobs_own_options_and_the_trainer_chooses_the_rest():
    trainer = RecordingTrainer()
    card = run_pipeline_trainer(trainer, lipsync_pb2.TrainingOptions(max_epochs=7, dropout=0.0, layers=0))
    assert card == {"prefix": "models/obama/3/", "summary": "stored models/obama/3/  epochs 1"}
    (spec,) = trainer.specs
    assert spec.settings() == {"max_epochs": 7, "dropout": 0.0}
    assert (spec.speaker, spec.dataset, spec.pca, spec.models_dir) == ("obama", SPEC.dataset, SPEC.pca, "/models")


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (Unavailable("training failed: UNAVAILABLE: trainer at x: down"), "UNAVAILABLE"),
        (CallFailed("NOT_FOUND", "training failed: NOT_FOUND: no dataset"), "NOT_FOUND"),
        (FailedPrecondition("training failed: trainer: error: boom"), "FAILED_PRECONDITION"),
    ],
)
def test_a_failed_training_fails_the_train_stage_with_the_trainers_status(error, status):
    with pytest.raises(StageFailed) as err:
        run_pipeline_trainer(RecordingTrainer(error), lipsync_pb2.TrainingOptions())
    assert err.value.stage == Stage.STAGE_TRAIN and err.value.status == status
    assert str(err.value).startswith("stage train failed: ") and "training failed" not in str(err.value)
    with pytest.raises(Cancelled):
        run_pipeline_trainer(RecordingTrainer(Cancelled("training was cancelled")), lipsync_pb2.TrainingOptions())


# -- the trainer service (docker compose) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dataset():
    return build_speaker_dataset([clip("train_a", 6.0, 1), clip("held_out", 3.0, 2)], validation_clip_ids=["held_out"])


@pytest.fixture()
def tiny_spec(store, key_prefix, tiny_dataset) -> TrainSpec:
    dataset_key, pca_key = upload(store, key_prefix, tiny_dataset.arrays(), tiny_dataset.pca.arrays())
    speaker = f"spk-{uuid.uuid4().hex[:10]}"
    options = lipsync_trainer.settings_to_proto(TINY)
    return TrainSpec(speaker, common_pb2.ObjectRef(key=dataset_key), common_pb2.ObjectRef(key=pca_key), options)


@pytest.fixture()
def grpc_trainer(store, run_server, tmp_path):
    servicer = TrainerServicer(store, models_dir=tmp_path / "models")
    port = run_server([binding_for(lipsync_pb2, lipsync_pb2_grpc, "TrainerService", servicer)])
    trainer = GrpcTrainer(f"127.0.0.1:{port}", timeout_seconds=120)
    yield trainer
    trainer.close()


@pytest.mark.integration
def test_the_grpc_trainer_reports_epochs_and_returns_the_stored_model(store, grpc_trainer, tiny_spec):
    epochs = []
    run = grpc_trainer.run(tiny_spec, on_epoch=lambda done, total: epochs.append((done, total)), stop=None)
    assert epochs == [(1, 2), (2, 2)]
    assert run.prefix == f"models/{tiny_spec.speaker}/1/" and run.summary.startswith(f"stored {run.prefix}")
    assert run.model.version == 1 and run.model.metrics.epochs == 2
    assert stored_versions(store, tiny_spec.speaker) == [1]


@pytest.mark.integration
def test_the_grpc_trainer_stops_the_training_when_the_job_is_cancelled(store, grpc_trainer, tiny_spec):
    options = lipsync_pb2.TrainingOptions()
    options.CopyFrom(tiny_spec.options)
    options.max_epochs, options.early_stopping_patience = 100000, 0
    spec = TrainSpec(tiny_spec.speaker, tiny_spec.dataset, tiny_spec.pca, options)
    stop = threading.Event()
    with pytest.raises(Cancelled):
        grpc_trainer.run(spec, on_epoch=lambda done, total: stop.set(), stop=stop)

    def training() -> bool:
        return any(t.name == "train-work" for t in threading.enumerate())

    assert wait_until(lambda: not training(), timeout=30), "the service went on training"
    assert stored_versions(store, spec.speaker) == []
    stop.set()
    with pytest.raises(Cancelled):  # a job cancelled before the call makes none
        grpc_trainer.run(spec, on_epoch=None, stop=stop)


@pytest.mark.integration
def test_the_grpc_trainer_keeps_the_services_status(grpc_trainer, tiny_spec, key_prefix):
    missing = TrainSpec(tiny_spec.speaker, common_pb2.ObjectRef(key=f"{key_prefix}/none.npz"), tiny_spec.pca)
    with pytest.raises(CallFailed, match="NOT_FOUND") as err:
        grpc_trainer.run(missing, on_epoch=None, stop=None)
    assert err.value.status == "NOT_FOUND"
    with pytest.raises(CallFailed) as err:
        grpc_trainer.run(TrainSpec("Bad Name", tiny_spec.dataset, tiny_spec.pca), on_epoch=None, stop=None)
    assert err.value.status == "INVALID_ARGUMENT"
    nobody = GrpcTrainer(f"127.0.0.1:{free_port()}", timeout_seconds=10)
    try:
        with pytest.raises(Unavailable, match="UNAVAILABLE"):
            nobody.run(tiny_spec, on_epoch=None, stop=None)
    finally:
        nobody.close()
