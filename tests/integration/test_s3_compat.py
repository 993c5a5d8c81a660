"""S3 compatibility: archiving works with the shipped least-privilege policy and on plainer stores.

Two kinds of test. A moto server of our own with authentication enforced, whose archive user holds
exactly deploy/s3-policy.json: archiving works, and what the policy leaves out is really refused. And
an S3 proxy (tests/integration/s3proxy.py) in front of the session's moto server that refuses the
optional calls (listing uploads, tags, checksum headers, HeadBucket) the way other stores do: nothing
is lost, each refusal is logged and counted once, and the refused call is not sent again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import pathlib
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import boto3
import boto3.session
import botocore.config
import botocore.exceptions
import pytest
import structlog.testing
from seedance_archiver import archive, errors, metrics, simulator
from seedance_archiver.archive import s3

from tests.helpers import OPTIONAL_CALLS, free_port, wait_for
from tests.integration import s3proxy

MIB = 1024 * 1024
SMALL = 100 * 1024
LARGE = s3.PART_BYTES + MIB + 12_345  # two parts
PREFIX = "seedance"  # the prefix deploy/s3-policy.json names
ROOT = pathlib.Path(__file__).resolve().parents[2]
POLICY = ROOT / "deploy" / "s3-policy.json"
OPTIONAL_POLICY = ROOT / "deploy" / "s3-policy-optional.json"
PLACEHOLDER_BUCKET = "my-video-bucket"
REFUSALS_METRIC = "seedance_storage_optional_refusals_total"
MOTO_START_SECONDS = 60.0

assert s3proxy.CHECKSUM == s3.CHECKSUM


async def video(task_id: str, size: int) -> AsyncIterator[bytes]:
    for chunk in simulator.video_chunks(task_id, size):
        yield chunk


def video_bytes(task_id: str, size: int) -> bytes:
    return b"".join(simulator.video_chunks(task_id, size))


def new_id() -> str:
    return f"video_{uuid.uuid4().hex[:10]}"


def refusals_counted(m: metrics.Metrics, call: str) -> float:
    return m.registry.get_sample_value(REFUSALS_METRIC, {"call": call}) or 0.0


def stored_bytes(admin: Any, bucket: str, key: str) -> bytes:
    return bytes(admin.get_object(Bucket=bucket, Key=key)["Body"].read())


def open_uploads(admin: Any, bucket: str, key: str) -> list[str]:
    answer = admin.list_multipart_uploads(Bucket=bucket, Prefix=key)
    return [u["UploadId"] for u in answer.get("Uploads", []) if u["Key"] == key]


async def archive_one(store: s3.S3Archive, admin: Any, bucket: str, size: int) -> archive.Stored:
    """Archive one video as the service does (find, discard leftovers, put); check what S3 holds."""
    task_id = new_id()
    assert await store.find(task_id) is None
    assert await store.discard_incomplete(task_id) == 0
    stored = await store.put(task_id, video(task_id, size), size)
    data = video_bytes(task_id, size)
    assert stored == archive.Stored(
        f"s3://{bucket}/{store.key(task_id)}", size, hashlib.sha256(data).hexdigest()
    )
    assert stored_bytes(admin, bucket, store.key(task_id)) == data
    return stored


def task_of(stored: archive.Stored) -> str:
    return stored.uri.rsplit("/", 1)[-1].removesuffix(".mp4")


# --- moto with authentication enforced ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AuthMoto:
    """A moto server that checks every request against IAM, and the users set up on it."""

    url: str
    bucket: str
    keys: dict[str, tuple[str, str]]  # user name -> (access key id, secret)

    def client(self, user: str) -> Any:
        """A plain boto3 client signing as ``user``."""
        key_id, secret = self.keys[user]
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )

    def archive(self, user: str, m: metrics.Metrics) -> s3.S3Archive:
        """The daemon's S3 archive, signing as ``user``."""
        key_id, secret = self.keys[user]
        client = s3.s3_client(
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )
        return s3.S3Archive(self.bucket, PREFIX, client, meters=m)


def _policy(path: pathlib.Path, bucket: str) -> str:
    """A shipped policy file, aimed at ``bucket`` instead of the placeholder."""
    text = path.read_text()
    assert PLACEHOLDER_BUCKET in text
    json.loads(text)
    return text.replace(PLACEHOLDER_BUCKET, bucket)


def _moto_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def auth_moto() -> Iterator[AuthMoto]:
    """Its own moto server, in a subprocess: moto's auth switch is process-wide, and the session's
    server (shared by other tests, in this process) must stay without auth."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _moto_answers(url), timeout=MOTO_START_SECONDS, what="moto to start")
        root = boto3.session.Session(
            aws_access_key_id="test-access-key",
            aws_secret_access_key="test-secret-key",
            region_name="us-east-1",
        )
        iam = root.client("iam", endpoint_url=url)
        bucket = f"videos-{uuid.uuid4().hex[:12]}"
        root.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
        everything = json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
        )
        policies = {
            "admin": [everything],
            "archiver": [_policy(POLICY, bucket)],
            "archiver-full": [_policy(POLICY, bucket), _policy(OPTIONAL_POLICY, bucket)],
        }
        keys: dict[str, tuple[str, str]] = {}
        for user, documents in policies.items():
            iam.create_user(UserName=user)
            for number, document in enumerate(documents):
                iam.put_user_policy(
                    UserName=user, PolicyName=f"policy-{number}", PolicyDocument=document
                )
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        # From now on every request must be signed by a known key and allowed by its policies.
        request = urllib.request.Request(
            f"{url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.loads(answer.read())["status"] == "ok"
        yield AuthMoto(url, bucket, keys)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _refused_code(call: Any) -> str:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call()
    return str(caught.value.response["Error"]["Code"])


class TestShippedPolicy:
    """deploy/s3-policy.json alone archives single-part and multipart videos; nothing more is allowed."""

    def test_the_policy_is_enforced(self, auth_moto: AuthMoto) -> None:
        """What the shipped policy leaves out is refused by this server: the tests below prove it."""
        s3 = auth_moto.client("archiver")
        bucket, key = auth_moto.bucket, f"{PREFIX}/{new_id()}.mp4"
        s3.put_object(Bucket=bucket, Key=key, Body=b"allowed")
        assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(b"allowed")

        assert _refused_code(lambda: s3.list_multipart_uploads(Bucket=bucket)) == "AccessDenied"
        tagging = {"TagSet": [{"Key": "sha256", "Value": "0" * 64}]}
        assert (
            _refused_code(lambda: s3.put_object_tagging(Bucket=bucket, Key=key, Tagging=tagging))
            == "AccessDenied"
        )
        assert (
            _refused_code(lambda: s3.get_object_tagging(Bucket=bucket, Key=key)) == "AccessDenied"
        )
        outside = f"elsewhere/{new_id()}.mp4"
        assert (
            _refused_code(lambda: s3.put_object(Bucket=bucket, Key=outside, Body=b"x"))
            == "AccessDenied"
        )
        assert _refused_code(lambda: s3.head_bucket(Bucket=bucket)) == "403"
        stranger = boto3.client(
            "s3",
            endpoint_url=auth_moto.url,
            region_name="us-east-1",
            aws_access_key_id="test-unknown-key",
            aws_secret_access_key="test-unknown-secret",
        )
        assert (
            _refused_code(lambda: stranger.put_object(Bucket=bucket, Key=key, Body=b"x"))
            == "InvalidAccessKeyId"
        )

    async def test_archives_with_the_shipped_policy_only(self, auth_moto: AuthMoto) -> None:
        m = metrics.Metrics()
        store = auth_moto.archive("archiver", m)
        admin = auth_moto.client("admin")

        await store.check()
        small = await archive_one(store, admin, auth_moto.bucket, SMALL)
        large = await archive_one(store, admin, auth_moto.bucket, LARGE)

        assert await store.find(task_of(small)) == small  # its SHA-256 is in its metadata
        # A multipart object's SHA-256 would be in a tag, which this policy does not allow: it is
        # not recognised, and would be uploaded again after a crash before the database write.
        assert await store.find(task_of(large)) is None
        assert await store.incomplete() == set()
        assert await store.discard_incomplete(new_id()) == 0
        head = admin.head_object(Bucket=auth_moto.bucket, Key=store.key(task_of(large)))
        assert head["ETag"].strip('"').endswith("-2")
        # The checksum headers need no permission; the other optional calls were refused.
        expected = {s3.LIST_UPLOADS, s3.PUT_TAGS, s3.GET_TAGS, s3.HEAD_BUCKET}
        assert set(store.refused) == expected
        for call in expected:
            assert refusals_counted(m, call) == 1

    async def test_the_optional_policy_adds_tags_and_cleanup(self, auth_moto: AuthMoto) -> None:
        m = metrics.Metrics()
        store = auth_moto.archive("archiver-full", m)
        admin = auth_moto.client("admin")
        stale_task = new_id()
        stale_key = store.key(stale_task)
        admin.create_multipart_upload(Bucket=auth_moto.bucket, Key=stale_key)

        await store.check()
        large = await archive_one(store, admin, auth_moto.bucket, LARGE)

        assert await store.find(task_of(large)) == large
        assert stale_task in await store.incomplete()
        assert await store.discard_incomplete(stale_task) == 1
        assert open_uploads(admin, auth_moto.bucket, stale_key) == []
        # moto checks HeadBucket against an "s3:HeadBucket" action that IAM does not have (AWS
        # checks s3:ListBucket), so only that one may still be refused here.
        assert set(store.refused) <= {s3.HEAD_BUCKET}


# --- a proxy that refuses optional calls ---------------------------------------------------------


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[s3proxy.S3Proxy]:
    with s3proxy.S3Proxy(s3_endpoint) as running:
        yield running


def proxied(proxy: s3proxy.S3Proxy, bucket: str, m: metrics.Metrics) -> s3.S3Archive:
    return s3.S3Archive(bucket, PREFIX, s3.s3_client(endpoint_url=proxy.url), meters=m)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Which optional calls the store refuses, and how."""

    calls: tuple[str, ...]
    status: int = 501
    code: str = "NotImplemented"

    @property
    def remembered(self) -> set[str]:
        # botocore always sends a checksum with PutObjectTagging: a store refusing checksum
        # headers refuses tags too.
        extra = {s3.PUT_TAGS} if s3.CHECKSUM in self.calls else set()
        return set(self.calls) | extra


REFUSALS = {
    **{f"{call}-501": Refusal((call,)) for call in OPTIONAL_CALLS},
    "all-501": Refusal(OPTIONAL_CALLS),
    "ListMultipartUploads-403-AccessDenied": Refusal((s3.LIST_UPLOADS,), 403, "AccessDenied"),
    "ListMultipartUploads-405": Refusal((s3.LIST_UPLOADS,), 405, "MethodNotAllowed"),
    "ChecksumCRC32-400-InvalidRequest": Refusal((s3.CHECKSUM,), 400, "InvalidRequest"),
    "ChecksumCRC32-400-InvalidArgument": Refusal((s3.CHECKSUM,), 400, "InvalidArgument"),
    "PutObjectTagging-400-InvalidRequest": Refusal((s3.PUT_TAGS,), 400, "InvalidRequest"),
    "GetObjectTagging-403-AccessDenied": Refusal((s3.GET_TAGS,), 403, "AccessDenied"),
    "HeadBucket-403": Refusal((s3.HEAD_BUCKET,), 403, "AccessDenied"),
    "HeadBucket-405": Refusal((s3.HEAD_BUCKET,), 405, "MethodNotAllowed"),
}


class TestRefusedOptionalCalls:
    """A store refusing an optional call loses no video; the refusal is logged, counted, remembered."""

    @pytest.mark.parametrize("refusal", REFUSALS.values(), ids=REFUSALS.keys())
    async def test_archiving_loses_nothing(
        self, refusal: Refusal, proxy: s3proxy.S3Proxy, s3_bucket: str, s3_client: Any
    ) -> None:
        for call in refusal.calls:
            proxy.refuse(call, refusal.status, refusal.code)
        m = metrics.Metrics()
        store = proxied(proxy, s3_bucket, m)
        stale_task = new_id()  # an upload a killed daemon left behind
        stale_key = store.key(stale_task)
        s3_client.create_multipart_upload(Bucket=s3_bucket, Key=stale_key)
        listing = s3.LIST_UPLOADS not in refusal.remembered
        tags = not {s3.PUT_TAGS, s3.GET_TAGS} & refusal.remembered

        seen: list[dict[str, int]] = []
        with structlog.testing.capture_logs() as logs:
            for _ in range(2):
                await store.check()
                small = await archive_one(store, s3_client, s3_bucket, SMALL)
                large = await archive_one(store, s3_client, s3_bucket, LARGE)
                assert await store.find(task_of(small)) == small
                assert await store.find(task_of(large)) == (large if tags else None)
                assert await store.incomplete() == ({stale_task} if listing and not seen else set())
                assert await store.discard_incomplete(stale_task) == (
                    1 if listing and not seen else 0
                )
                seen.append(proxy.counts())

        # Stale uploads are still cleaned up where they can be listed, and stay where they cannot.
        assert bool(open_uploads(s3_client, s3_bucket, stale_key)) is not listing
        assert set(store.refused) == refusal.remembered
        events = [e for e in logs if e["event"] == "storage_feature_refused"]
        assert sorted(e["call"] for e in events) == sorted(refusal.remembered)
        for event in events:
            assert refusal.code in event["reason"] or str(refusal.status) in event["reason"]
            assert event["effect"]
        for call in refusal.remembered:
            assert refusals_counted(m, call) == 1
            assert seen[0].get(call, 0) >= 1, f"{call} was never asked"
            assert seen[1].get(call, 0) == seen[0][call], f"{call} was asked again"
        for call in set(OPTIONAL_CALLS) - refusal.remembered - {s3.CHECKSUM}:
            assert refusals_counted(m, call) == 0
        assert proxy.refused[s3.LIST_UPLOADS] <= 1  # once refused, never asked again

    async def test_a_refused_checksum_is_retried_without_it(
        self, proxy: s3proxy.S3Proxy, s3_bucket: str, s3_client: Any
    ) -> None:
        """The refused CreateMultipartUpload goes again, plain; no part carries a checksum."""
        proxy.refuse(s3.CHECKSUM, 400, "InvalidRequest")
        store = proxied(proxy, s3_bucket, metrics.Metrics())

        await archive_one(store, s3_client, s3_bucket, LARGE)

        counts = proxy.counts()
        assert counts["CreateMultipartUpload"] == 2  # with the checksum, refused; then without
        assert counts["UploadPart"] == 2  # each part once, plain
        # The checksummed requests: the first CreateMultipartUpload and the PutObjectTagging.
        assert counts[s3.CHECKSUM] == 2
        assert store.refused[s3.CHECKSUM].startswith("CreateMultipartUpload: InvalidRequest")

    async def test_a_part_refused_for_its_checksum_goes_again_whole(
        self, proxy: s3proxy.S3Proxy, s3_bucket: str, s3_client: Any
    ) -> None:
        """A store that takes the checksum at creation but refuses it on a part: the part goes
        again without it, from its first byte (the refused attempt read the body to its end)."""
        proxy.refuse("UploadPart+" + s3proxy.CHECKSUM, 400, "InvalidRequest")
        # No retries: botocore's own retry rewinds the body, which would hide a missing rewind
        # (the part's second attempt would wait out the read timeout, then go again whole). The
        # read timeout stays botocore's 60 s, so a slow moto on a busy machine is no failure.
        client = boto3.client(
            "s3",
            endpoint_url=proxy.url,
            config=botocore.config.Config(
                retries={"total_max_attempts": 1},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        store = s3.S3Archive(s3_bucket, PREFIX, client, meters=metrics.Metrics())

        await archive_one(store, s3_client, s3_bucket, LARGE)  # checks every byte S3 holds

        assert proxy.refused["UploadPart"] >= 1
        assert proxy.count("UploadPart") == 2 + proxy.refused["UploadPart"]
        assert store.refused[s3.CHECKSUM].startswith("UploadPart: InvalidRequest")

    async def test_a_refused_put_is_not_taken_for_a_refused_checksum(
        self, proxy: s3proxy.S3Proxy, s3_bucket: str
    ) -> None:
        """A store refusing uploads altogether fails the archive, and the checksum is not blamed."""
        proxy.refuse("CreateMultipartUpload", 403, "AccessDenied")
        store = proxied(proxy, s3_bucket, metrics.Metrics())
        task_id = new_id()
        with pytest.raises(errors.ArchiveError, match="AccessDenied"):
            await store.put(task_id, video(task_id, LARGE), LARGE)
        assert proxy.count("CreateMultipartUpload") == 2  # with the checksum, then without
        assert store.refused == {}


class TestTransientFailures:
    """A failure that may pass (5xx, throttling) is logged and retried next time, never remembered."""

    async def test_a_503_on_listing_uploads(
        self, proxy: s3proxy.S3Proxy, s3_bucket: str, s3_client: Any
    ) -> None:
        store = proxied(proxy, s3_bucket, metrics.Metrics())
        stale_task = new_id()
        s3_client.create_multipart_upload(Bucket=s3_bucket, Key=store.key(stale_task))
        proxy.refuse(s3.LIST_UPLOADS, 503, "SlowDown")

        with structlog.testing.capture_logs() as logs:
            assert await store.incomplete() == set()
            assert await store.discard_incomplete(stale_task) == 0
        assert store.refused == {}
        assert not [e for e in logs if e["event"] == "storage_feature_refused"]
        failed = [e for e in logs if e["event"] == "storage_call_failed"]
        assert [e["call"] for e in failed] == [s3.LIST_UPLOADS] * 2
        asked = proxy.count(s3.LIST_UPLOADS)

        proxy.allow(s3.LIST_UPLOADS)
        assert await store.discard_incomplete(stale_task) == 1
        assert proxy.count(s3.LIST_UPLOADS) == asked + 1
        assert open_uploads(s3_client, s3_bucket, store.key(stale_task)) == []

    async def test_a_500_on_reading_tags(
        self, proxy: s3proxy.S3Proxy, s3_bucket: str, s3_client: Any
    ) -> None:
        store = proxied(proxy, s3_bucket, metrics.Metrics())
        large = await archive_one(store, s3_client, s3_bucket, LARGE)
        proxy.refuse(s3.GET_TAGS, 500, "InternalError")
        assert await store.find(task_of(large)) is None
        proxy.allow(s3.GET_TAGS)
        assert await store.find(task_of(large)) == large
        assert store.refused == {}

    async def test_a_503_on_a_checksummed_upload(
        self, proxy: s3proxy.S3Proxy, s3_bucket: str, s3_client: Any
    ) -> None:
        """On the critical path a transient failure fails the attempt, and the checksum stays."""
        store = proxied(proxy, s3_bucket, metrics.Metrics())
        proxy.refuse(s3.CHECKSUM, 503, "SlowDown")
        task_id = new_id()
        with pytest.raises(errors.ArchiveError, match="SlowDown"):
            await store.put(task_id, video(task_id, LARGE), LARGE)
        assert store.refused == {}
        assert open_uploads(s3_client, s3_bucket, store.key(task_id)) == []

        proxy.allow(s3.CHECKSUM)
        before = proxy.count(s3.CHECKSUM)
        await archive_one(store, s3_client, s3_bucket, LARGE)
        assert proxy.count(s3.CHECKSUM) > before  # the parts carried their CRC32 again

    async def test_a_503_on_head_bucket(self, proxy: s3proxy.S3Proxy, s3_bucket: str) -> None:
        store = proxied(proxy, s3_bucket, metrics.Metrics())
        proxy.refuse(s3.HEAD_BUCKET, 503, "ServiceUnavailable")
        await store.check()  # the bucket answered a GetObject instead
        assert proxy.count("GetObject") == 1
        proxy.allow(s3.HEAD_BUCKET)
        asked = proxy.count(s3.HEAD_BUCKET)
        await store.check()
        assert proxy.count(s3.HEAD_BUCKET) == asked + 1
        assert store.refused == {}


class TestCheckWithoutHeadBucket:
    """check() without HeadBucket still fails for a missing bucket, bad credentials or no server."""

    async def test_a_missing_bucket(self, proxy: s3proxy.S3Proxy) -> None:
        proxy.refuse(s3.HEAD_BUCKET, 403, "AccessDenied")
        store = proxied(proxy, f"missing-{uuid.uuid4().hex[:12]}", metrics.Metrics())
        with pytest.raises(errors.ArchiveError, match="NoSuchBucket"):
            await store.check()
        assert s3.HEAD_BUCKET in store.refused

    async def test_a_missing_bucket_with_head_bucket(self, proxy: s3proxy.S3Proxy) -> None:
        store = proxied(proxy, f"missing-{uuid.uuid4().hex[:12]}", metrics.Metrics())
        with pytest.raises(errors.ArchiveError, match="not found"):
            await store.check()
        assert store.refused == {}

    async def test_credentials_the_store_does_not_know(
        self, proxy: s3proxy.S3Proxy, s3_bucket: str
    ) -> None:
        proxy.refuse(s3.HEAD_BUCKET, 403, "AccessDenied")
        proxy.refuse("GetObject", 403, "InvalidAccessKeyId")
        store = proxied(proxy, s3_bucket, metrics.Metrics())
        with pytest.raises(errors.ArchiveError, match="InvalidAccessKeyId"):
            await store.check()

    async def test_no_server(self, s3_endpoint: str, s3_bucket: str) -> None:
        m = metrics.Metrics()
        with s3proxy.S3Proxy(s3_endpoint) as gone:
            gone.refuse(s3.HEAD_BUCKET)
            store = proxied(gone, s3_bucket, m)
            await store.check()
        # The proxy stopped: nothing listens on its port any more.
        with pytest.raises(errors.ArchiveError, match="cannot reach the S3 endpoint http://127"):
            await store.check()

    async def test_like_aws_without_list_bucket(
        self, proxy: s3proxy.S3Proxy, s3_bucket: str, s3_client: Any
    ) -> None:
        """AWS answers 403 for a missing object without s3:ListBucket: not archived, not an error."""
        proxy.hide_missing = True
        proxy.refuse(s3.HEAD_BUCKET, 403, "AccessDenied")
        store = proxied(proxy, s3_bucket, metrics.Metrics())
        with structlog.testing.capture_logs() as logs:
            await store.check()
            small = await archive_one(store, s3_client, s3_bucket, SMALL)
            await archive_one(store, s3_client, s3_bucket, SMALL)
        assert await store.find(task_of(small)) == small
        assert [e["event"] for e in logs].count("object_head_forbidden") == 1
        assert proxy.refused["HeadObject"] == 2  # both missing objects answered 403


class TestDefaults:
    """from_url hands metrics and executor on; the default client reads boto3's environment."""

    async def test_from_url_passes_metrics_and_executor(
        self, proxy: s3proxy.S3Proxy, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        m = metrics.Metrics()
        names: list[str] = []

        class Recording(concurrent.futures.ThreadPoolExecutor):
            def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
                names.append(getattr(fn, "func", fn).__name__)
                return super().submit(fn, *args, **kwargs)

        with Recording(max_workers=2) as executor:
            store = archive.from_url(f"s3://{s3_bucket}/{PREFIX}", meters=m, executor=executor)
            assert isinstance(store, s3.S3Archive)
            proxy.refuse(s3.LIST_UPLOADS)
            assert await store.discard_incomplete(new_id()) == 0
        assert refusals_counted(m, s3.LIST_UPLOADS) == 1
        assert names == ["list_multipart_uploads"]
        assert proxy.count(s3.LIST_UPLOADS) == 1  # the default client found the endpoint
