"""Archiving one large video: the daemon's streaming path against ``curl | aws s3 cp -`` on this machine.

The simulator (``python -m seedance_archiver.simulator``) serves one deterministic video of ``--size``
bytes (default 1 GiB) and moto's S3 server (``python -m moto.server``) stands in for S3; each runs in
its own process and talks on 127.0.0.1 only. With ``--s3-endpoint URL`` an S3 server already running
there is used instead of moto (e.g. Ceph's radosgw, started by ``bench/rgw.sh``), with the credentials
of ``--s3-access-key``/``--s3-secret-key`` or else ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
(the secret is never printed); the bucket is created if it is missing, and the header and the table
name the server. Every measurement of the daemon runs in a fresh child Python process so its peak RSS
is its own:

- **daemon -> S3**: ``http.HttpProvider(...).fetch(id)`` for the link, then
  ``async with http.open_video(task) as video: await s3.S3Archive(bucket, "bench").put(id,
  video.chunks, video.length)`` (8 MiB multipart parts, ``PARTS_IN_FLIGHT`` of them uploading at once).
- **warm-up** (not measured): one more daemon upload to S3 before the measured ones of each run:
  moto's first upload after a pause runs ~20% slower than the next, whoever sends it (done on any
  server, so every measured upload follows another).
- **daemon -> folder**: the same into ``folder.FileArchive(tmpdir)`` (write, fsync, rename).

The child reads its RSS after its imports (the baseline: ``VmRSS`` from ``/proc/self/status``) and
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux: the peak) after the transfer, plus the
peak (``VmHWM``) of the folder's writer process it started, and checks
``stored.sha256`` against ``seedance_archiver.simulator.video_sha256``; the parent checks the stored
object's size with HeadObject. The optional S3 calls the store refused (``S3Archive.refused``:
checksum headers, tags, ...) are printed under the row. Wall time covers ``open_video`` + ``put``
(not the child's interpreter start or imports, nor the one poll before it).

The references, on the same simulator and the same S3 server, timed as whole shell pipelines (process
start included, which is why the aws CLI's start-up time is printed beside them):

- **curl | aws s3 cp -**: ``curl -s URL | aws s3 cp - s3://bucket/ref/x.mp4 --endpoint-url ...``, the
  target of DESIGN.md (aws CLI defaults: 8 MiB parts, up to 10 in flight). When no ``aws`` is on PATH,
  the closest honest stand-in is used and labelled as such: boto3's ``upload_fileobj`` from stdin with
  a ``TransferConfig`` of 8 MiB multipart parts.
- **curl -o file && sync file**: the folder backend's reference (the daemon fsyncs; so does this).
- **curl -o /dev/null**: how fast the simulator can serve the video at all (the ceiling of every row).

Each S3 object is deleted after its measurement (moto keeps objects in memory, and so does the
memstore OSD of ``bench/rgw.sh``). ``--only s3`` or ``--only file`` keeps the simulator ceiling and
the rows of that backend only.

Run from the repository root: ``.venv/bin/python -m bench.archive [--size 1073741824] [--repeat 1]
[--only s3|file] [--s3-endpoint http://127.0.0.1:7480 [--s3-access-key KEY --s3-secret-key SECRET]]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from bench import common

DEFAULT_SIZE = 1024**3
TASK_ID = "bench-archive-video"
BUCKET = "bench-archive"
PREFIX = "bench"
REF_KEY = "ref/x.mp4"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MEASURE_TIMEOUT_SECONDS = 900.0
POLLS_FOR_LINK = 20
MIB = 1024 * 1024
MB = 1_000_000

BOTO3_STDIN_UPLOAD = """
import sys, boto3
from boto3.s3.transfer import TransferConfig
config = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)
boto3.client("s3").upload_fileobj(sys.stdin.buffer, sys.argv[1], sys.argv[2], Config=config)
"""


# --- the child: one measurement of the daemon's path --------------------------------------------


def _vm_rss_kib() -> int:
    return _status_kib("self", "VmRSS:")


def _status_kib(pid: int | str, field: str) -> int:
    """A KiB field of /proc/PID/status (0 if the process is gone)."""
    try:
        text = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


async def _child_transfer(args: argparse.Namespace) -> dict[str, object]:
    from seedance_archiver import archive, models, netguard
    from seedance_archiver.archive import folder, s3
    from seedance_archiver.providers import http as providers_http
    from seedance_archiver.providers import reseller

    baseline_kib = _vm_rss_kib()
    baseline_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store: archive.Archive
    if args.child == "s3":
        store = s3.S3Archive(args.bucket, PREFIX)
    else:
        store = folder.FileArchive(pathlib.Path(args.folder))
    http = providers_http.HttpProvider(
        args.sim_url,
        common.API_KEY,
        url_rules=netguard.UrlRules(schemes=frozenset({"http"}), allow_private_hosts=True),
        max_video_bytes=max(args.size, 2 * 1024**3),
        dialect=reseller.DIALECT,
    )
    try:
        answer = await http.fetch(args.task_id)
        for _ in range(POLLS_FOR_LINK):
            if answer.video_url is not None:
                break
            await asyncio.sleep(0.05)
            answer = await http.fetch(args.task_id)
        if answer.video_url is None:
            raise RuntimeError(f"the simulator gave no video_url: {answer}")
        started = time.perf_counter()
        async with http.open_video(
            models.Task(task_id=args.task_id, video_url=answer.video_url)
        ) as video:
            stored = await store.put(args.task_id, video.chunks, video.length)
        wall = time.perf_counter() - started
    finally:
        await http.aclose()
    # A folder's writer process holds the bytes it writes: its peak counts as the daemon's too.
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + sum(
        _status_kib(pid, "VmHWM:") for pid in common.child_pids(os.getpid())
    )
    refused = store.refused if isinstance(store, s3.S3Archive) else {}
    return {
        "wall": wall,
        "size": stored.size,
        "refused": refused,
        "sha_ok": stored.sha256 == args.expected_sha,
        "uri": stored.uri,
        "baseline_kib": baseline_kib,
        "baseline_peak_kib": baseline_peak_kib,
        "peak_kib": peak_kib,
    }


def child_main(args: argparse.Namespace) -> None:
    result = asyncio.run(_child_transfer(args))
    print(json.dumps(result), flush=True)


# --- the parent: servers, references, table ------------------------------------------------------


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's S3 server in its own process; yield its endpoint URL."""
    port = common.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", common.HOST, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        common.wait_for_port(port)
        if proc.poll() is not None:
            raise RuntimeError(f"moto.server exited with {proc.returncode}")
        yield f"http://{common.HOST}:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=common.PROCESS_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=common.PROCESS_STOP_SECONDS)


# radosgw sends no Server header; its request ids look like "tx000...-006b115679-1016-default".
RGW_REQUEST_ID = re.compile(r"^tx[0-9a-f]{21,}-[0-9a-f]+-[0-9a-f]+-")


def s3_server_name(endpoint: str) -> str:
    """What answers at ``endpoint``, from one anonymous ``GET /``: its ``Server`` header, or
    "radosgw" (with the version of the local ``radosgw`` binary, if any) by its request ids."""
    try:
        with urllib.request.urlopen(endpoint.rstrip("/") + "/", timeout=10) as response:
            response.read()  # all of it: a server may log a connection closed mid-answer
            headers = response.headers
    except urllib.error.HTTPError as exc:  # 403 for anonymous listing is an answer too
        exc.read()
        headers = exc.headers
    if headers.get("Server"):
        return str(headers["Server"])
    if RGW_REQUEST_ID.match(headers.get("x-amz-request-id", "")):
        radosgw = shutil.which("radosgw")
        if radosgw is None:
            return "radosgw"
        done = subprocess.run([radosgw, "--version"], capture_output=True, text=True, timeout=30)
        words = done.stdout.split()  # "ceph version 16.2.15 (618f...) pacific (stable)"
        return f"radosgw {words[2]} ({words[4]})" if len(words) > 4 else "radosgw"
    return "an S3 server"


def s3_credentials(args: argparse.Namespace) -> dict[str, str]:
    """The AWS_* variables for the children and the aws CLI: moto's dummies, or the given ones."""
    if args.s3_endpoint is None:
        return dict(FAKE_AWS)
    access = args.s3_access_key or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = args.s3_secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise SystemExit(
            "--s3-endpoint needs --s3-access-key/--s3-secret-key or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    return {
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION")
        or FAKE_AWS["AWS_DEFAULT_REGION"],
    }


@contextlib.contextmanager
def s3_server(endpoint: str | None) -> Iterator[tuple[str, str]]:
    """Yield (endpoint URL, description): moto started here, or the server at ``endpoint``."""
    if endpoint is not None:
        yield endpoint.rstrip("/"), f"{s3_server_name(endpoint)} at {endpoint.rstrip('/')}"
        return
    import moto

    with moto_server() as url:
        yield url, f"moto {moto.__version__} (python -m moto.server) at {url}"


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create ``bucket`` unless it is there (a server of our own starts empty; another may not)."""
    import botocore.exceptions

    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) not in {"404", "NoSuchBucket"}:
            raise
        client.create_bucket(Bucket=bucket)


def fresh_video_url(sim_url: str) -> str:
    """A newly signed link to the video (links expire), as the daemon would get it."""
    request = urllib.request.Request(
        f"{sim_url}/v1/result/{TASK_ID}", headers={"Authorization": f"Bearer {common.API_KEY}"}
    )
    # The simulator creates the task on the first poll; it answers "completed" from the next one.
    for _ in range(POLLS_FOR_LINK):
        with urllib.request.urlopen(request, timeout=10) as response:
            url = json.loads(response.read()).get("video_url")
        if url:
            return str(url)
        time.sleep(0.05)
    raise RuntimeError(f"no video_url from the simulator after {POLLS_FOR_LINK} polls")


def run_child(
    kind: str, sim_url: str, size: int, expected_sha: str, env: dict[str, str], folder: str
) -> dict[str, object]:
    command = [
        sys.executable,
        "-m",
        "bench.archive",
        "--child",
        kind,
        "--sim-url",
        sim_url,
        "--size",
        str(size),
        "--task-id",
        TASK_ID,
        "--expected-sha",
        expected_sha,
        "--bucket",
        BUCKET,
        "--folder",
        folder,
    ]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=MEASURE_TIMEOUT_SECONDS
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {kind} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_shell(pipeline: str, env: dict[str, str]) -> float:
    """Wall seconds of ``bash -o pipefail -c pipeline``; raise if it fails."""
    started = time.perf_counter()
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", pipeline],
        env=env,
        capture_output=True,
        text=True,
        timeout=MEASURE_TIMEOUT_SECONDS,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{pipeline!r} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall


def machine_line() -> str:
    model = "?"
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    ram_kib = 0
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            ram_kib = int(line.split()[1])
    return (
        f"machine: {model}, {os.cpu_count()} cores, {ram_kib / 1024**2:.1f} GiB RAM, "
        f"Python {platform.python_version()}"
    )


def parent_main(args: argparse.Namespace) -> None:
    import boto3
    from seedance_archiver import simulator

    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl is not on PATH: no reference")
    aws = shutil.which("aws")
    credentials = s3_credentials(args)
    env = {**os.environ, **credentials}
    env.pop("AWS_PROFILE", None)
    print(machine_line())
    print(
        f"size: {args.size} bytes ({args.size / MIB:.0f} MiB), repeat: {args.repeat}, "
        f"rows: {args.only or 's3 and file'}"
    )
    started = time.perf_counter()
    expected_sha = simulator.video_sha256(TASK_ID, args.size)
    print(f"expected sha256 {expected_sha} ({time.perf_counter() - started:.1f} s to compute)")

    auto = json.dumps({"ready_seconds": 0, "queued_seconds": 0, "size": args.size})
    rows: list[list[object]] = []
    refusals: dict[str, str] = {}
    with (
        common.simulator(auto=auto) as (sim_url, _sim_pid),
        s3_server(args.s3_endpoint) as (s3_url, s3_name),
        tempfile.TemporaryDirectory(prefix="bench-archive-") as tmp,
    ):
        print(f"S3 server: {s3_name}")
        env["AWS_ENDPOINT_URL_S3"] = s3_url
        client = boto3.client(
            "s3",
            endpoint_url=s3_url,
            aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
            region_name=credentials["AWS_DEFAULT_REGION"],
        )
        ensure_bucket(client, BUCKET)
        if aws is not None:
            started = time.perf_counter()
            version = subprocess.run(
                [aws, "--version"], env=env, capture_output=True, text=True, timeout=60
            )
            aws_start = time.perf_counter() - started
            aws_version = (version.stdout or version.stderr).split(" ", 1)[0]
            print(
                f"aws CLI: {aws}, {aws_version} (start-up: `aws --version` takes {aws_start:.2f} s)"
            )
            s3_ref_name = "curl -s URL \\| aws s3 cp - s3://… (reference)"
        else:
            print("aws CLI: not found; reference is curl | boto3 upload_fileobj (8 MiB parts)")
            s3_ref_name = "curl -s URL \\| boto3 upload_fileobj, 8 MiB parts (stand-in reference)"
        folder = pathlib.Path(tmp) / "archive"
        ref_file = pathlib.Path(tmp) / "ref.mp4"

        def add(name: str, run: int, wall: float, peak: str, base: str, ok: str) -> None:
            rate = args.size / MB / wall
            rows.append([name, run, f"{wall:.2f}", f"{rate:.0f}", peak, base, ok])
            print(f"  {name}: {wall:.2f} s, {rate:.0f} MB/s, peak RSS {peak}", flush=True)

        def add_daemon(name: str, run: int, result: dict[str, Any]) -> None:
            # The hash and size the daemon computed while streaming, and (S3) the stored size.
            ok = (
                result["sha_ok"]
                and result["size"] == result.get("stored_size", args.size) == args.size
            )
            add(
                name,
                run,
                float(result["wall"]),
                f"{int(result['peak_kib']) / 1024:.1f}",
                f"{int(result['baseline_kib']) / 1024:.1f}",
                "yes" if ok else "NO",
            )
            for call, reason in dict(result.get("refused") or {}).items():
                print(f"    the store refused {call}: {reason}", flush=True)
                refusals.setdefault(call, reason)

        for run in range(1, args.repeat + 1):
            print(f"run {run}", flush=True)
            url = shlex.quote(fresh_video_url(sim_url))
            add(
                "curl -s URL -o /dev/null (simulator ceiling)",
                run,
                run_shell(f"curl -sf {url} -o /dev/null", env),
                "",
                "",
                "",
            )

            if args.only in (None, "s3"):
                # Not measured: moto's first upload after a pause runs ~20% slower than the next
                # one, whoever sends it (seen with either order of the daemon and the aws CLI), so
                # each measured upload follows another.
                run_child("s3", sim_url, args.size, expected_sha, env, str(folder))
                client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{TASK_ID}.mp4")

                result = run_child("s3", sim_url, args.size, expected_sha, env, str(folder))
                head = client.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{TASK_ID}.mp4")
                result["stored_size"] = head["ContentLength"]
                add_daemon("**daemon: HttpProvider.open_video -> S3Archive.put**", run, result)
                client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{TASK_ID}.mp4")

                url = shlex.quote(fresh_video_url(sim_url))
                target = shlex.quote(f"s3://{BUCKET}/{REF_KEY}")
                if aws is not None:
                    upload = (
                        f"{shlex.quote(aws)} s3 cp - {target} --endpoint-url {shlex.quote(s3_url)}"
                        " --only-show-errors"
                    )
                else:
                    upload = (
                        f"{shlex.quote(sys.executable)} -c {shlex.quote(BOTO3_STDIN_UPLOAD)} "
                        f"{BUCKET} {REF_KEY}"
                    )
                wall = run_shell(f"curl -sf {url} | {upload}", env)
                head = client.head_object(Bucket=BUCKET, Key=REF_KEY)
                ok = "size ok" if head["ContentLength"] == args.size else "NO"
                add(s3_ref_name, run, wall, "", "", ok)
                client.delete_object(Bucket=BUCKET, Key=REF_KEY)

            if args.only == "s3":
                continue
            result = run_child("file", sim_url, args.size, expected_sha, env, str(folder))
            add_daemon("**daemon: HttpProvider.open_video -> FileArchive.put**", run, result)
            shutil.rmtree(folder, ignore_errors=True)

            url = shlex.quote(fresh_video_url(sim_url))
            out = shlex.quote(str(ref_file))
            wall = run_shell(f"curl -sf {url} -o {out} && sync {out}", env)
            ok = "size ok" if ref_file.stat().st_size == args.size else "NO"
            add("curl -s URL -o file && sync file (reference)", run, wall, "", "", ok)
            ref_file.unlink()

    print()
    print(f"S3 server: {s3_name}")
    print(
        common.markdown_table(
            ["path", "run", "wall s", "MB/s", "peak RSS MiB", "RSS after imports MiB", "verified"],
            rows,
        )
    )
    for call, reason in refusals.items():
        print(f"the store refused {call}: {reason}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="video bytes")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every measurement")
    parser.add_argument(
        "--only",
        choices=["s3", "file"],
        help="only this backend's rows (and the simulator ceiling)",
    )
    parser.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="an S3 server already running (e.g. bench/rgw.sh's radosgw) instead of starting moto",
    )
    parser.add_argument(
        "--s3-access-key", metavar="KEY", help="for --s3-endpoint; default: $AWS_ACCESS_KEY_ID"
    )
    parser.add_argument(
        "--s3-secret-key",
        metavar="SECRET",
        help="for --s3-endpoint; default: $AWS_SECRET_ACCESS_KEY (never printed)",
    )
    # Internal: one measurement in a child process.
    parser.add_argument("--child", choices=["s3", "file"], help=argparse.SUPPRESS)
    parser.add_argument("--sim-url", help=argparse.SUPPRESS)
    parser.add_argument("--task-id", default=TASK_ID, help=argparse.SUPPRESS)
    parser.add_argument("--expected-sha", help=argparse.SUPPRESS)
    parser.add_argument("--bucket", default=BUCKET, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.repeat > 20:
        parser.error("--repeat must be 1..20")
    if args.s3_endpoint is None and (args.s3_access_key or args.s3_secret_key):
        parser.error("--s3-access-key/--s3-secret-key go with --s3-endpoint")
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
