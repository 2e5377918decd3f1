"""Where TrainSpeaker's trainer runs: the command line, its output, the Kubernetes Job made from the template."""

import re

import kubernetes_validate
import pytest

from orchestrator.trainers import (
    LocalTrainer,
    follow_output,
    job_from_template,
    job_name,
    trainer_arguments,
    trainer_from_env,
)
from services.runtime.config import ConfigError
from services.runtime.errors import FailedPrecondition
from tests.deploy.test_manifests import K8S_VERSION, OVERLAYS, find, rendered

ARGUMENTS = trainer_arguments(
    "obama", "datasets/obama/x.npz", "datasets/obama/pca.npz", {"max_epochs": 300, "batch_size": 10}, "/models"
)


def test_arguments_name_the_data_and_the_settings_as_the_trainer_spells_them():
    assert ARGUMENTS == [
        "--speaker", "obama", "--dataset", "datasets/obama/x.npz", "--pca", "datasets/obama/pca.npz",
        "--models-dir", "/models", "--epochs", "300", "--batch-size", "10",
    ]  # fmt: skip


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
        LocalTrainer(environ=environ).run(ARGUMENTS, on_epoch=None, stop=None)


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


def test_job_names_differ_per_run_and_fit_dns_labels():
    long_name = job_name("a_very_long_speaker_name_with_underscores_" * 2, ARGUMENTS)
    assert len(long_name) <= 63 and "_" not in long_name
    assert job_name("obama", ARGUMENTS) != job_name("obama", [*ARGUMENTS, "--seed", "2"])


def test_the_trainer_is_chosen_by_the_environment(tmp_path):
    assert isinstance(trainer_from_env({}), LocalTrainer)
    with pytest.raises(ConfigError, match="A2V_NAMESPACE"):
        trainer_from_env({"A2V_TRAINER": "kubernetes"})
    with pytest.raises(ConfigError, match="'local' or 'kubernetes'"):
        trainer_from_env({"A2V_TRAINER": "docker"})


def test_kubernetes_without_cluster_credentials_is_a_configuration_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="no cluster credentials"):
        trainer_from_env({"A2V_TRAINER": "kubernetes", "A2V_NAMESPACE": "audio2video"})
