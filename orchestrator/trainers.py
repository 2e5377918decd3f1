"""Where the LSTM trainer runs for a TrainSpeaker job: a local process, a Kubernetes Job, or a gRPC service.

The orchestrator image carries no TensorFlow, so outside the local stack the trainer runs from its own image: in
a cluster as a Job made from the suspended `trainer` CronJob template (k8s/base/trainer.yaml; the gpu overlay puts
it on GPU nodes), under docker compose as the long-running `trainer` service (lipsync.v1.TrainerService at
A2V_TRAINER_ADDR). The process and the Job run the same command line and are read the same way: `epoch i/n ...`
lines for progress and a final `stored <prefix> ...` line naming the model; the service streams the same epochs
and returns the stored version. Every launcher takes a `TrainSpec` and returns a `TrainerRun`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from audio2video.common.v1 import common_pb2
from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from services.runtime.clients import create_channel, rpc_failure
from services.runtime.config import ConfigError, service_address
from services.runtime.errors import CallFailed, Cancelled, FailedPrecondition, Unavailable
from services.runtime.security import ClientSecurity
from services.runtime.telemetry import current_job_id

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
TRAINER_MODULE = "services.lipsync.trainer"
TRAINER_CONTAINER = "trainer"
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)\b")
TRAINER_SERVICE = "audio2video.lipsync.v1.TrainerService"
TRAINER_KINDS = ("local", "kubernetes", "grpc")
DEFAULT_TRAIN_TIMEOUT_SECONDS = 86400.0
"""Deadline of one training call to the trainer service (training on real data takes hours)."""


class EpochProgress(Protocol):
    def __call__(self, done: int, total: int) -> None: ...


@dataclass(frozen=True)
class TrainSpec:
    """One training run: what to train on and how, the same for every launcher.

    Attributes:
        speaker: the speaker name ([a-z0-9_-]{1,64}; the TF Serving model name).
        dataset: the dataset .npz (face.v1.BuildSpeakerDatasetResult.dataset).
        pca: the mouth PCA .npz of the same build.
        options: hyper-parameters; the fields set here are passed on explicitly, the others take the trainer's
            defaults (lipsync.v1.TrainingOptions).
        models_dir: the process's and the Job's `--models-dir` (where the new version is also written); the
            trainer service writes to its own A2V_MODELS_DIR instead.
    """

    speaker: str
    dataset: common_pb2.ObjectRef
    pca: common_pb2.ObjectRef
    options: lipsync_pb2.TrainingOptions = field(default_factory=lipsync_pb2.TrainingOptions)
    models_dir: str | None = None

    def settings(self) -> dict[str, Any]:
        """The options that are set, by TrainingOptions field name (= lstm.TrainingSettings field name)."""
        return {descriptor.name: value for descriptor, value in self.options.ListFields()}

    def arguments(self) -> list[str]:
        """The trainer's command line (without the interpreter and module)."""
        return trainer_arguments(self.speaker, self.dataset.key, self.pca.key, self.settings(), self.models_dir)

    def request(self, request_id: str = "") -> lipsync_pb2.TrainRequest:
        """The trainer service's request."""
        return lipsync_pb2.TrainRequest(
            speaker=self.speaker, dataset=self.dataset, pca=self.pca, options=self.options, request_id=request_id
        )


@dataclass(frozen=True)
class TrainerRun:
    """What a finished trainer reported: the stored model's prefix and its summary line (and, from the trainer
    service, the stored version as described by lipsync.v1.ModelVersion)."""

    prefix: str
    summary: str
    model: lipsync_pb2.ModelVersion | None = None


def trainer_arguments(
    speaker: str, dataset_key: str, pca_key: str, settings: Mapping[str, Any], models_dir: str | None = None
) -> list[str]:
    """The trainer's command-line arguments (without the interpreter and module)."""
    arguments = ["--speaker", speaker, "--dataset", dataset_key, "--pca", pca_key]
    if models_dir:
        arguments += ["--models-dir", models_dir]
    for name, value in settings.items():
        flag = {"max_epochs": "epochs", "early_stopping_patience": "patience"}.get(name, name)
        arguments += [f"--{flag.replace('_', '-')}", str(value)]
    return arguments


def follow_output(lines: Iterable[str], on_epoch: EpochProgress | None) -> TrainerRun | None:
    """Read the trainer's output to its end: report epochs; the run it stored (None if it stored nothing).

    Raises FailedPrecondition with the trainer's own error line when it printed one and stored nothing.
    """
    kept: list[str] = []
    for raw in lines:
        line = raw.rstrip()
        kept.append(line)
        del kept[:-50]
        match = EPOCH_LINE.match(line)
        if match and on_epoch:
            on_epoch(int(match.group(1)), int(match.group(2)))
    summary = next((line for line in reversed(kept) if line.startswith("stored ")), "")
    if summary:
        return TrainerRun(prefix=summary.split()[1], summary=summary)
    reason = next((line for line in reversed(kept) if "error" in line.lower()), kept[-1] if kept else "")
    raise FailedPrecondition(f"training failed: {reason or 'the trainer ended without storing a model'}")


class LocalTrainer:
    """The trainer as a child process of the orchestrator (the local stack)."""

    def __init__(self, *, environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)

    def run(self, spec: TrainSpec, *, on_epoch: EpochProgress | None, stop: threading.Event | None) -> TrainerRun:
        env = {**self.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        process = subprocess.Popen(
            [sys.executable, "-m", TRAINER_MODULE, *spec.arguments()],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        watcher = _stop_watcher(stop, process.terminate)
        try:
            run = follow_output(process.stdout, on_epoch)
        except FailedPrecondition:
            process.wait()
            if stop is not None and stop.is_set():
                raise Cancelled("training was cancelled") from None
            raise
        finally:
            watcher.set()
        if process.wait() != 0:
            if stop is not None and stop.is_set():
                raise Cancelled("training was cancelled")
            raise FailedPrecondition(f"the trainer exited with status {process.returncode}")
        return run


def _stop_watcher(stop: threading.Event | None, action) -> threading.Event:
    """Call `action` once `stop` is set (until the returned event is set)."""
    finished = threading.Event()
    if stop is None:
        return finished

    def watch() -> None:
        while not finished.is_set():
            if stop.wait(0.5):
                action()
                return

    threading.Thread(target=watch, name="trainer-stop", daemon=True).start()
    return finished


# -- Kubernetes ---------------------------------------------------------------------------------------


def job_name(speaker: str, arguments: list[str], owner: str = "") -> str:
    """A DNS-1123 name for the training run: trainer-<speaker>-<hash of the arguments>-<suffix>.

    With `owner` (the orchestrator's job id) the suffix is a hash of it: the same for every replica that runs that
    job, so one that takes a job over finds the trainer Job its dead owner started and follows it instead of
    starting a second training. Without one, the time.
    """
    digest = hashlib.sha256("\0".join(arguments).encode()).hexdigest()[:8]
    suffix = hashlib.sha256(owner.encode()).hexdigest()[:10] if owner else format(int(time.time()), "x")
    prefix = re.sub(r"[^a-z0-9-]", "-", speaker.lower()).strip("-")[:30] or "speaker"
    return f"trainer-{prefix}-{digest}-{suffix}"


def job_from_template(
    cron_job: Mapping[str, Any], name: str, speaker: str, arguments: list[str], owner: str = ""
) -> dict[str, Any]:
    """A batch/v1 Job from the `trainer` CronJob's jobTemplate, running the trainer with `arguments`.

    Everything else (image, resources, GPU node selection, volumes, security) comes from the template, so
    the overlays decide where training runs. The `A2V_TRAIN_SPEAKER` default in the template is replaced.
    `owner`, the orchestrator job it trains for, labels the Job and its pod (`audio2video/job-id`) and is the
    trainer's A2V_JOB_ID, so its logs carry it.
    """
    template = copy.deepcopy(cron_job["spec"]["jobTemplate"])
    labels = {**template.get("metadata", {}).get("labels", {}), "audio2video/speaker": speaker}
    if owner:
        labels["audio2video/job-id"] = owner
    spec = template["spec"]
    pod = spec["template"]
    pod.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    containers = [c for c in pod["spec"]["containers"] if c["name"] == TRAINER_CONTAINER]
    if not containers:
        raise FailedPrecondition(f"the trainer template has no container named {TRAINER_CONTAINER!r}")
    container = containers[0]
    container["args"] = list(arguments)
    settings = {"A2V_TRAIN_SPEAKER": speaker} | ({"A2V_JOB_ID": owner} if owner else {})
    container["env"] = [e for e in container.get("env", []) if e["name"] not in settings]
    container["env"] += [{"name": key, "value": value} for key, value in settings.items()]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": cron_job["metadata"].get("namespace"),
            "labels": labels,
            "annotations": {"audio2video/created-by": "orchestrator TrainSpeaker"},
        },
        "spec": spec,
    }


class KubernetesTrainer:
    """The trainer as a Kubernetes Job made from the `trainer` CronJob template, followed through its logs.

    Needs the orchestrator's ServiceAccount (k8s/base/orchestrator.yaml): read the CronJob, create, read and
    delete Jobs, list Pods and read their logs, in its own namespace only.
    """

    def __init__(self, namespace: str, template: str = "trainer", *, poll_seconds: float = 2.0) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as exc:
                raise ConfigError(f"A2V_TRAINER=kubernetes but no cluster credentials were found: {exc}") from exc
        self.namespace, self.template, self.poll_seconds = namespace, template, poll_seconds
        self.batch, self.core = client.BatchV1Api(), client.CoreV1Api()
        self.api_exception = client.exceptions.ApiException

    def run(self, spec: TrainSpec, *, on_epoch: EpochProgress | None, stop: threading.Event | None) -> TrainerRun:
        speaker, arguments, owner = spec.speaker, spec.arguments(), current_job_id()
        name = job_name(speaker, arguments, owner)
        try:
            cron_job = self.batch.api_client.sanitize_for_serialization(
                self.batch.read_namespaced_cron_job(self.template, self.namespace)
            )
            body = job_from_template(cron_job, name, speaker, arguments, owner)
            body["metadata"]["namespace"] = self.namespace
            name = self._create_or_adopt(body)
        except self.api_exception as exc:
            raise Unavailable(f"could not start the trainer Job: {exc.status} {exc.reason}") from exc
        watcher = _stop_watcher(stop, lambda: self._delete(name))
        try:
            pod = self._wait_for_pod(name, stop)
            run = follow_output(self._log_lines(pod), on_epoch)
            self._wait_for_job(name, stop)
            return run
        except FailedPrecondition:
            if stop is not None and stop.is_set():
                raise Cancelled("training was cancelled") from None
            raise
        finally:
            watcher.set()

    def _create_or_adopt(self, body: dict[str, Any]) -> str:
        """Create the trainer Job; one of that name that runs or succeeded already (started for this job by a
        replica that died) is followed instead. One that failed is left for inspection and a new one made
        beside it (a retry). Returns the name of the Job to follow."""
        name = body["metadata"]["name"]
        try:
            self.batch.create_namespaced_job(self.namespace, body)
            log.info("started trainer job %s for speaker %s", name, body["metadata"]["labels"]["audio2video/speaker"])
            return name
        except self.api_exception as exc:
            if exc.status != 409:  # AlreadyExists
                raise
        status = self.batch.read_namespaced_job_status(name, self.namespace).status
        if status.active or status.succeeded or not status.failed:
            log.info("following trainer job %s, which an earlier owner of this job started", name)
            return name
        retry = dict(body, metadata=dict(body["metadata"], name=f"{name[:52]}-{format(int(time.time()), 'x')}"))
        self.batch.create_namespaced_job(self.namespace, retry)
        log.info("trainer job %s had failed; started %s", name, retry["metadata"]["name"])
        return retry["metadata"]["name"]

    def _pause(self, stop: threading.Event | None) -> None:
        """Wait one poll interval; Cancelled as soon as `stop` is set."""
        if stop is None:
            time.sleep(self.poll_seconds)
        elif stop.wait(self.poll_seconds):
            raise Cancelled("training was cancelled")

    def _wait_for_pod(self, name: str, stop: threading.Event | None) -> str:
        """The Job's pod once it runs (or already ended); FailedPrecondition if it cannot start."""
        while True:
            if stop is not None and stop.is_set():
                raise Cancelled("training was cancelled")
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={name}").items
            for pod in pods:
                if pod.status.phase in ("Running", "Succeeded", "Failed"):
                    return pod.metadata.name
                waiting = [
                    s.state.waiting
                    for s in (pod.status.container_statuses or [])
                    if s.state and s.state.waiting and s.state.waiting.reason in ("ErrImagePull", "ImagePullBackOff")
                ]
                if waiting:
                    raise FailedPrecondition(f"trainer pod {pod.metadata.name}: {waiting[0].reason}")
            self._pause(stop)

    def _log_lines(self, pod: str) -> Iterator[str]:
        response = self.core.read_namespaced_pod_log(
            pod, self.namespace, container=TRAINER_CONTAINER, follow=True, _preload_content=False
        )
        pending = b""
        for chunk in response.stream(4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode(errors="replace")
        if pending:
            yield pending.decode(errors="replace")

    def _wait_for_job(self, name: str, stop: threading.Event | None) -> None:
        while True:
            status = self.batch.read_namespaced_job_status(name, self.namespace).status
            if status.succeeded:
                return
            if status.failed and not status.active:
                raise FailedPrecondition(f"trainer Job {name} failed")
            self._pause(stop)

    def _delete(self, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background")
        except self.api_exception as exc:
            log.warning("could not delete trainer job %s: %s", name, exc.reason)


# -- gRPC -----------------------------------------------------------------------------------------------


class GrpcTrainer:
    """The trainer as a gRPC service (lipsync.v1.TrainerService; the `trainer` service of docker compose).

    The call streams epochs and ends with the stored version. Setting `stop` cancels the call, which stops the
    training before its next batch. The channel retries UNAVAILABLE only while nothing has been received (the
    request never reached a trainer); a trainer lost mid-run fails the run with UNAVAILABLE.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_seconds: float = DEFAULT_TRAIN_TIMEOUT_SECONDS,
        security: ClientSecurity | None = None,
    ) -> None:
        self.address = address
        self.timeout_seconds = timeout_seconds
        self.channel = create_channel(address, [TRAINER_SERVICE], timeout_seconds=timeout_seconds, security=security)
        self.stub = lipsync_pb2_grpc.TrainerServiceStub(self.channel)

    def run(self, spec: TrainSpec, *, on_epoch: EpochProgress | None, stop: threading.Event | None) -> TrainerRun:
        if stop is not None and stop.is_set():
            raise Cancelled("training was cancelled")
        call = self.stub.Train(spec.request(), timeout=self.timeout_seconds)
        watcher = _stop_watcher(stop, call.cancel)
        result = None
        try:
            for event in call:
                if event.HasField("result"):
                    result = event.result
                elif on_epoch is not None and event.progress.total > 0:
                    on_epoch(int(event.progress.done), int(event.progress.total))
        except grpc.RpcError as exc:
            if stop is not None and stop.is_set():
                raise Cancelled("training was cancelled") from exc
            code, detail = rpc_failure(exc)
            if code == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(f"training failed: UNAVAILABLE: trainer at {self.address}: {detail}") from exc
            raise CallFailed(code.name, f"training failed: {code.name}: {detail}") from exc
        finally:
            watcher.set()
        if result is None:
            raise FailedPrecondition("training failed: the trainer ended its stream without a result")
        return TrainerRun(prefix=result.model.prefix, summary=result.summary, model=result.model)

    def close(self) -> None:
        self.channel.close()


Trainer = LocalTrainer | KubernetesTrainer | GrpcTrainer


def trainer_from_env(environ: Mapping[str, str] | None = None) -> Trainer:
    """A2V_TRAINER: `local` (default; a child process), `kubernetes` (a Job in A2V_NAMESPACE from the CronJob
    named by A2V_TRAINER_TEMPLATE, default `trainer`) or `grpc` (the trainer service at A2V_TRAINER_ADDR)."""
    env = os.environ if environ is None else environ
    kind = env.get("A2V_TRAINER", "local").strip() or "local"
    if kind == "local":
        return LocalTrainer(environ=env)
    if kind == "kubernetes":
        namespace = env.get("A2V_NAMESPACE", "").strip()
        if not namespace:
            raise ConfigError("A2V_TRAINER=kubernetes needs A2V_NAMESPACE (the pod's namespace, downward API)")
        return KubernetesTrainer(namespace, env.get("A2V_TRAINER_TEMPLATE", "trainer").strip() or "trainer")
    if kind == "grpc":
        return GrpcTrainer(service_address("trainer", env), security=ClientSecurity.from_env(env))
    raise ConfigError(f"A2V_TRAINER must be one of {', '.join(TRAINER_KINDS)}, not {kind!r}")
