"""The container image, built and run for real: ``make image-check``, never part of ``make test``.

deploy/Dockerfile is built with the classic builder (no BuildKit, no frontend image, nothing pulled
but the base image), then run the way deploy/compose.yaml runs it (read-only root, no capability,
no new privileges, a tmpfs /tmp, secrets as files): ``migrate`` against PostgreSQL on 127.0.0.1:5432,
then the daemon against the simulator, fed by plain SQL, archiving to a folder bind-mounted from
here. Every container uses the host's network (the engine of ../shared/tools/standin-image.sh has
no bridge), so all traffic stays on loopback. The containers and the database go at the end.

Needs DOCKER_HOST (``make image-check`` gets it from the shared script) and PostgreSQL; where either
is missing the module skips and says why, and with CI=true it fails instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import yaml
from seedance_archiver import simulator
from seedance_archiver.archive import folder

from tests.helpers import IN_CI, PG_ADMIN_DSN, SIM_KEY, base_env, free_port, wait_for

pytestmark = pytest.mark.image

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
# The base to build on: the stand-in the shared script imports (it has no registry digest, so the
# Dockerfile's digest-pinned default cannot be used here).
BASE_IMAGE = os.environ.get("SEEDANCE_IMAGE_BASE", "python:3.11-slim-bookworm")
TAG = f"seedance-archiver:image-check-{os.getpid()}"
IMAGE_UID = 10001
BUILD_TIMEOUT_SECONDS = 900
# The daemon's own grace for downloads in flight, and `docker stop -t`: the second must outlast
# the first, as the Dockerfile's comment asks of --stop-timeout.
SHUTDOWN_GRACE_SECONDS = 5
STOP_TIMEOUT_SECONDS = 20
HEALTH_INTERVAL = "1s"
HTTP_HOST = "127.0.0.2"  # loopback, as every container here shares the host's network
FIRST_VIDEO_BYTES = 3 * 1024 * 1024 + 17
# Throttled to 256 KiB/s, the slow video takes 32 s: a stop is sure to find it downloading.
SLOW_VIDEO_BYTES = 8 * 1024 * 1024
SLOW_BYTES_PER_SECOND = 256 * 1024
MAX_CONTEXT_BYTES = 5e6
SECRETS = pathlib.PurePosixPath("/run/secrets")
ARCHIVE_MOUNT = pathlib.PurePosixPath("/archive")


def _need(condition: bool, message: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{message}; CI=true: the image check must run")
    pytest.skip(message)


def docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """One docker CLI command; with ``check``, a failure raises with its output."""
    docker_cli = shutil.which("docker")
    assert docker_cli is not None
    result = subprocess.run(
        [docker_cli, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args[:2])} exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _inspect(name: str, template: str) -> Any:
    return json.loads(docker("inspect", "--format", "{{json " + template + "}}", name).stdout)


def _bytes(human: str) -> float:
    """Docker's decimal size ("419.3kB", "1.2MB") in bytes."""
    match = re.fullmatch(r"([\d.]+)([kMG]?B)", human)
    assert match, human
    return float(match[1]) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[match[2]]


def _lockdown_flags() -> list[str]:
    """The docker run flags of compose's x-app block: the image runs here as compose runs it."""
    app = yaml.safe_load(COMPOSE.read_text())["x-app"]
    flags = ["--read-only"] if app["read_only"] else []
    flags += [f"--cap-drop={cap}" for cap in app["cap_drop"]]
    flags += [f"--security-opt={opt}" for opt in app["security_opt"]]
    flags += [f"--tmpfs={mount}" for mount in app["tmpfs"]]
    return flags


# --- the engine, the image, the database, the simulator -------------------------------------------


@pytest.fixture(scope="module")
def engine() -> None:
    _need(shutil.which("docker") is not None, "the docker CLI is not installed")
    _need(bool(os.environ.get("DOCKER_HOST")), "DOCKER_HOST is not set (make image-check sets it)")
    info = docker("info", "--format", "{{.ServerVersion}}", check=False)
    _need(info.returncode == 0, f"no Docker engine at {os.environ.get('DOCKER_HOST')}")
    print(f"\n  engine: Docker {info.stdout.strip()} at {os.environ['DOCKER_HOST']}")


@dataclasses.dataclass
class Build:
    tag: str
    seconds: float
    log: str


@pytest.fixture(scope="module")
def image(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Build]:
    """deploy/Dockerfile built by the classic builder, on the base image at hand, pulling nothing."""
    _need(
        docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0,
        f"the base image {BASE_IMAGE} is not in the engine (../shared/tools/standin-image.sh)",
    )
    env = os.environ | {"DOCKER_BUILDKIT": "0"}
    argv = ["build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    argv += ["-f", str(DOCKERFILE), "-t", TAG, str(ROOT)]
    started = time.monotonic()
    result = subprocess.run(
        [str(shutil.which("docker")), *argv],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
        check=False,
        env=env,
    )
    seconds = time.monotonic() - started
    log = result.stdout + result.stderr
    (tmp_path_factory.mktemp("build") / "build.log").write_text(log)
    assert result.returncode == 0, f"docker build failed:\n{log[-5000:]}"
    try:
        yield Build(TAG, seconds, log)
    finally:
        docker("image", "rm", "--force", TAG, check=False)


@pytest.fixture(scope="module")
def database(engine: None) -> Iterator[str]:
    """An empty throwaway PostgreSQL database: its URL, as seen from a host-network container."""
    name = f"seedance_img_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        _need(False, f"PostgreSQL is unreachable at {PG_ADMIN_DSN.split('@')[-1]}: {exc}")
        raise
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Sim:
    """The provider simulator in a process of its own on loopback, driven over its /_sim API."""

    def __init__(self, log_path: pathlib.Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "seedance_archiver.simulator", "--port", str(self.port)]
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*argv, "--api-key", SIM_KEY], stdout=log, stderr=subprocess.STDOUT
            )

    def call(self, method: str, path: str, body: object = None) -> Any:
        # http.client, not urllib: a proxy in the environment must not see loopback traffic.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            payload = None if body is None else json.dumps(body)
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200, (method, path, response.status)
            return json.loads(response.read())
        finally:
            conn.close()

    def up(self) -> bool:
        assert self.process.poll() is None, "the simulator exited"
        try:
            self.call("GET", "/_sim/stats")
        except OSError:
            return False
        return True

    def add(self, task_id: str, size: int, *faults: dict[str, Any]) -> None:
        self.call("POST", "/_sim/tasks", [{"id": task_id, "size": size, "ready_seconds": 1.0}])
        if faults:
            self.call("POST", "/_sim/faults", {task_id: [dict(f, on="download") for f in faults]})

    def downloads(self, task_id: str) -> tuple[int, int]:
        """How many downloads of ``task_id`` started, and how many finished."""
        stats = self.call("GET", "/_sim/stats")
        return (
            stats["downloads_started"].get(task_id, 0),
            stats["downloads_completed"].get(task_id, 0),
        )


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    server = Sim(tmp_path_factory.mktemp("sim") / "simulator.log")
    try:
        wait_for(server.up, timeout=30, interval=0.1, what="the simulator to listen")
        yield server
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)


# --- containers -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Stack:
    """What the containers share: the image, the database, the archive folder, the secrets."""

    image: str
    database_url: str
    sim: Sim
    archive_dir: pathlib.Path
    secrets_dir: pathlib.Path
    names: list[str] = dataclasses.field(default_factory=list)

    def _run_args(self, name: str) -> list[str]:
        self.names.append(name)
        return [
            "--name",
            name,
            "--network",
            "host",
            *_lockdown_flags(),
            "--volume",
            f"{self.secrets_dir}:{SECRETS}:ro",
            "--env",
            f"SEEDANCE_DATABASE_URL_FILE={SECRETS / 'seedance_database_url'}",
        ]

    def migrate(self) -> subprocess.CompletedProcess[str]:
        name = f"seedance-img-migrate-{uuid.uuid4().hex[:8]}"
        return docker("run", *self._run_args(name), self.image, "migrate", check=False)

    def start_daemon(self) -> str:
        """Start ``run`` detached, with the test daemon's settings; its container name."""
        name = f"seedance-img-run-{uuid.uuid4().hex[:8]}"
        settings = base_env(self.sim.url, "", f"file://{ARCHIVE_MOUNT}")
        settings = {k: v for k, v in settings.items() if k.startswith("SEEDANCE_")}
        for key in ("SEEDANCE_API_KEY", "SEEDANCE_DATABASE_URL"):
            del settings[key]  # both come as files, as compose gives them
        settings["SEEDANCE_API_KEY_FILE"] = str(SECRETS / "seedance_api_key")
        settings["SEEDANCE_HTTP_PORT"] = str(free_port())
        # Not the default 127.0.0.1: the HEALTHCHECK must ask where the daemon listens.
        settings["SEEDANCE_HTTP_HOST"] = HTTP_HOST
        settings["SEEDANCE_SHUTDOWN_GRACE_SECONDS"] = str(SHUTDOWN_GRACE_SECONDS)
        argv = ["run", "--detach", *self._run_args(name)]
        argv += ["--volume", f"{self.archive_dir}:{ARCHIVE_MOUNT}"]
        argv += ["--health-interval", HEALTH_INTERVAL, "--health-timeout", "5s"]
        for key, value in sorted(settings.items()):
            argv += ["--env", f"{key}={value}"]
        docker(*argv, self.image, "run")
        return name

    def logs(self, name: str) -> str:
        result = docker("logs", name, check=False)
        return (result.stdout + result.stderr)[-4000:]

    def running(self, name: str) -> bool:
        state = _inspect(name, ".State")
        assert state["Running"], f"{name} exited {state['ExitCode']}:\n{self.logs(name)}"
        return True

    def row(self, task_id: str) -> dict[str, Any] | None:
        """The task's row as the application reads it."""
        with psycopg.connect(self.database_url) as conn:
            cursor = conn.execute(
                "SELECT state, archive_uri, archive_bytes, archive_sha256, lease_owner"
                " FROM video_tasks WHERE task_id = %s",
                (task_id,),
            )
            found = cursor.fetchone()
            names = [column.name for column in cursor.description or []]
        return None if found is None else dict(zip(names, found, strict=True))

    def wait_archived(self, container: str, task_id: str, size: int) -> dict[str, Any]:
        """Wait (while ``container`` runs) for the row to be archived; check the row and the file."""

        def archived() -> dict[str, Any] | None:
            self.running(container)
            found = self.row(task_id)
            return found if found and found["state"] == "archived" else None

        row = wait_for(archived, timeout=90, interval=0.2, what=f"{task_id} to be archived")
        assert isinstance(row, dict)
        self.assert_archived(task_id, size, row)
        return row

    def assert_archived(self, task_id: str, size: int, row: dict[str, Any]) -> None:
        """The row's size and SHA-256, and the file's, are those of the simulator's video."""
        expected = simulator.video_sha256(task_id, size)
        assert (row["archive_bytes"], row["archive_sha256"]) == (size, expected), row
        path = self.archive_dir / f"{task_id}.mp4"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected, path

    def remove_all(self) -> None:
        for name in self.names:
            docker("rm", "--force", "--volumes", name, check=False)


def _feed(database_url: str, task_id: str, mode: str) -> None:
    """What the application does: one plain INSERT (README, "Feeding it tasks")."""
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO video_tasks (task_id, mode) VALUES (%s, %s)", (task_id, mode))


@pytest.fixture(scope="module")
def stack(
    image: Build, database: str, sim: Sim, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    for url in (sim.url, database):  # the containers share the host's network: loopback only
        assert urllib.parse.urlsplit(url).hostname in {"127.0.0.1", "localhost"}, url
    root = tmp_path_factory.mktemp("stack")
    archive_dir = root / "archive"
    archive_dir.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(archive_dir, IMAGE_UID, IMAGE_UID)  # the image's user writes there, nobody else
    else:
        archive_dir.chmod(0o777)
    secrets_dir = root / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "seedance_api_key").write_text(SIM_KEY)
    (secrets_dir / "seedance_database_url").write_text(database)
    for path in secrets_dir.iterdir():
        path.chmod(0o644)  # bind-mounted as they are, as compose's secrets are
    built = Stack(image.tag, database, sim, archive_dir, secrets_dir)
    try:
        yield built
    finally:
        built.remove_all()


@pytest.fixture(scope="module")
def migrated(stack: Stack) -> subprocess.CompletedProcess[str]:
    """`migrate` run once in a container against the empty database."""
    return stack.migrate()


@pytest.fixture(scope="module")
def first_daemon(stack: Stack, migrated: subprocess.CompletedProcess[str]) -> str:
    assert migrated.returncode == 0, migrated.stderr
    return stack.start_daemon()


# --- the checks -----------------------------------------------------------------------------------


class TestImage:
    """The built image: what it is, and what it does against real services."""

    def test_builds_with_the_classic_builder_pulling_nothing(self, image: Build) -> None:
        """The build pulls no image (no frontend, no base) and the context holds only sources."""
        assert "Pulling from" not in image.log
        (context,) = re.findall(r"Sending build context to Docker daemon\s+(\S+)", image.log)
        size = int(docker("image", "inspect", "--format", "{{.Size}}", image.tag).stdout)
        print(f"\n  image: built in {image.seconds:.1f} s; {size / 1e6:.0f} MB; {context} context")
        # .dockerignore lets only the sources through: .venv or .git would be hundreds of MB.
        assert _bytes(context) < MAX_CONTEXT_BYTES, context
        config = _inspect(image.tag, ".Config")
        assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
        assert config["Entrypoint"] == ["seedance-archiver"] and config["Cmd"] == ["run"]
        assert config["Healthcheck"]["Test"][0] == "CMD"

    def test_migrate_creates_the_schema(
        self, stack: Stack, migrated: subprocess.CompletedProcess[str]
    ) -> None:
        """`migrate` in a locked-down container creates the table; a second run is a no-op."""
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        with psycopg.connect(stack.database_url) as conn:
            (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone() or ("",)
            assert conn.execute("SELECT count(*) FROM video_tasks").fetchone() == (0,)
        assert version, "alembic_version is empty"
        again = stack.migrate()
        assert again.returncode == 0, again.stderr

    def test_daemon_archives_a_video_fed_by_sql(self, stack: Stack, first_daemon: str) -> None:
        """A row inserted with plain SQL ends `archived`, the file's SHA-256 the simulator's own."""
        task_id = "video_img_first"
        stack.sim.add(task_id, FIRST_VIDEO_BYTES)
        _feed(stack.database_url, task_id, "standard")
        row = stack.wait_archived(first_daemon, task_id, FIRST_VIDEO_BYTES)
        assert row["archive_uri"] == f"file://{ARCHIVE_MOUNT}/{task_id}.mp4"
        assert (stack.archive_dir / f"{task_id}.mp4").stat().st_uid == IMAGE_UID

    def test_healthcheck_turns_healthy(self, stack: Stack, first_daemon: str) -> None:
        """The image's HEALTHCHECK (run by the engine, at a 1 s interval here) reports healthy,
        asking the daemon where it listens (SEEDANCE_HTTP_HOST=127.0.0.2)."""

        def healthy() -> bool:
            stack.running(first_daemon)
            return bool(_inspect(first_daemon, ".State.Health.Status") == "healthy")

        wait_for(healthy, timeout=60, interval=0.5, what="the container to turn healthy")
        checks = _inspect(first_daemon, ".State.Health.Log")
        assert checks and checks[-1]["ExitCode"] == 0, checks
        assert f"http://{HTTP_HOST}:" in checks[-1]["Output"], checks

    def test_healthcheck_says_when_the_port_is_off(self, image: Build) -> None:
        """The HEALTHCHECK's own command, in the image, with SEEDANCE_HTTP_PORT=0: it fails and
        says the port is off (no traceback)."""
        test = _inspect(image.tag, ".Config.Healthcheck.Test")
        assert test[0] == "CMD", test
        argv = ["run", "--rm", "--network", "host", *_lockdown_flags()]
        argv += ["--env", "SEEDANCE_HTTP_PORT=0", "--entrypoint", test[1], image.tag, *test[2:]]
        result = docker(*argv, check=False)
        assert result.returncode == 1, result
        assert result.stdout.startswith("unhealthy: SEEDANCE_HTTP_PORT=0 turns"), result
        assert "Traceback" not in result.stderr, result

    def test_docker_stop_during_a_download_is_graceful_and_loses_nothing(
        self, stack: Stack, first_daemon: str
    ) -> None:
        """`docker stop` while a video downloads: exit 0 within the grace, and it is archived later.

        The first download answers 503, so the row is written `downloading`; the retry is throttled,
        and the stop comes while it runs. The daemon gives it its grace, gives the row back, exits 0;
        a new container archives the video (the fault is used up: at full speed now).
        """
        task_id = "video_img_slow"
        stack.sim.add(
            task_id, SLOW_VIDEO_BYTES, {"status": 503}, {"throttle": SLOW_BYTES_PER_SECOND}
        )
        _feed(stack.database_url, task_id, "draft")

        def downloading() -> bool:
            stack.running(first_daemon)
            row = stack.row(task_id)
            in_flight = stack.sim.downloads(task_id) == (1, 0)  # started, not finished
            return bool(row and row["state"] == "downloading" and in_flight)

        wait_for(downloading, timeout=60, interval=0.1, what=f"{task_id} to be downloading")
        started = time.monotonic()
        stop = docker(
            "stop",
            "--time",
            str(STOP_TIMEOUT_SECONDS),
            first_daemon,
            check=False,
            timeout=STOP_TIMEOUT_SECONDS + 30,
        )
        seconds = time.monotonic() - started
        print(
            f"\n  docker stop: exit {stop.returncode} after {seconds:.1f} s"
            f" (--time {STOP_TIMEOUT_SECONDS}, daemon grace {SHUTDOWN_GRACE_SECONDS} s)"
        )
        assert stop.returncode == 0, stop.stderr
        assert seconds < STOP_TIMEOUT_SECONDS, "the engine had to SIGKILL it"
        state = _inspect(first_daemon, ".State")
        logs = stack.logs(first_daemon)
        assert (state["ExitCode"], state["OOMKilled"]) == (0, False), logs
        assert "abandoned_in_flight_work" in logs, "the stop did not catch the download in flight"
        assert stack.sim.downloads(task_id) == (1, 0)
        row = stack.row(task_id)
        assert row is not None and row["state"] == "downloading", row
        assert row["lease_owner"] is None, "the lease was not given back"
        assert not list((stack.archive_dir / folder.INCOMING_DIR).glob("*.part"))

        second = stack.start_daemon()
        stack.wait_archived(second, task_id, SLOW_VIDEO_BYTES)
        first = stack.row("video_img_first")
        assert first is not None
        stack.assert_archived("video_img_first", FIRST_VIDEO_BYTES, first)
        assert stack.sim.downloads(task_id) == (2, 1)
        docker("stop", "--time", str(STOP_TIMEOUT_SECONDS), second, timeout=60)
        assert _inspect(second, ".State.ExitCode") == 0, stack.logs(second)


class TestCompose:
    """deploy/compose.yaml, read by a real Compose implementation."""

    @staticmethod
    def _compose() -> str:
        compose = shutil.which("docker-compose")
        _need(
            compose is not None, "docker-compose is not installed (apt-get install docker-compose)"
        )
        assert compose is not None
        return compose

    def test_docker_compose_config_accepts_the_file(self) -> None:
        """`docker-compose config` validates and resolves it: the build context is this repository."""
        result = subprocess.run(
            [self._compose(), "-f", str(COMPOSE), "config"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        resolved = yaml.safe_load(result.stdout)
        for name in ("migrate", "archiver"):
            build = resolved["services"][name]["build"]
            assert pathlib.Path(build["context"]) == ROOT
            assert build["dockerfile"] == DOCKERFILE.relative_to(ROOT).as_posix()
        version = subprocess.run(
            [self._compose(), "version", "--short"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        print(f"\n  docker-compose {version.stdout.strip()}: config accepts {COMPOSE.name}")

    def test_docker_compose_config_refuses_a_broken_file(self, tmp_path: pathlib.Path) -> None:
        """The same command fails on a misspelt option, so its success above means something."""
        broken = yaml.safe_load(COMPOSE.read_text())
        broken["services"]["archiver"]["stop_grace_periode"] = "45s"
        path = tmp_path / "compose.yaml"
        path.write_text(yaml.safe_dump(broken))
        result = subprocess.run(
            [self._compose(), "-f", str(path), "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0 and "stop_grace_periode" in result.stderr, result
