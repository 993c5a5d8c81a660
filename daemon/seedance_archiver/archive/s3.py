"""The S3 store (``s3://``): ``s3://{bucket}/{prefix}/{task_id}.mp4``, one PUT below a part's size,
else a multipart upload completed only when every byte arrived and aborted otherwise, so a partial
object never appears under the final key. The one module that imports boto3.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import os
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from seedance_archiver import archive, errors, metrics

try:
    import boto3
    import botocore.config
    import botocore.exceptions
except ImportError as exc:  # boto3 is a core dependency: only an install that trimmed it
    raise errors.MissingDependencyError(
        "an s3:// archive needs boto3, which is not installed: pip install boto3"
    ) from exc

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

# The aws CLI's part size. A transfer holds PARTS_IN_FLIGHT + 1 part buffers, reused: 8 MiB parts
# peaked at 133 MiB for 1 GiB and uploaded to radosgw 25% faster than S3's minimum of 5 MiB, which
# costs radosgw more per byte (bench/archive.py, bench/README.md).
PART_BYTES = 8 * 1024 * 1024
MAX_PARTS = 10_000  # S3's most parts per upload: 78 GiB at PART_BYTES


def part_size(expected_size: int | None) -> int:
    """The part size for a video of ``expected_size`` bytes: PART_BYTES, or more where the video
    would otherwise need more than MAX_PARTS parts."""
    if expected_size is None:
        return PART_BYTES
    return max(PART_BYTES, -(-expected_size // MAX_PARTS))


PARTS_IN_FLIGHT = 2  # parts uploading at once while the download goes on (bench/README.md)


class _PartBody:
    """The first ``size`` bytes of a part's buffer as the file botocore reads a body from.

    botocore hashes (SigV4, CRC32) and sends a file body by ``read(n)``, rewinding with ``seek``
    between passes and before a retry, so the part is read in place, a piece at a time, and never
    copied whole. Joining each part's chunks into a ``bytes`` instead made a new part-sized block
    per part, and the allocator kept the freed ones: peak RSS grew by about twice the bytes in
    flight (bench/README.md).
    """

    def __init__(self, buffer: bytearray, size: int) -> None:
        self._view = memoryview(buffer)[:size]
        self._position = 0

    def __len__(self) -> int:
        return len(self._view)

    def read(self, size: int | None = -1) -> bytes:
        start = self._position
        end = len(self._view) if size is None or size < 0 else min(start + size, len(self._view))
        self._position = end
        return self._view[start:end].tobytes()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: len(self._view)}[whence]
        self._position = min(max(base + offset, 0), len(self._view))
        return self._position

    def tell(self) -> int:
        return self._position


# The optional S3 calls, by the name they carry in logs and in the storage_refusals metric. The
# critical path (HeadObject, GetObject, PutObject and the four multipart calls) needs none of them.
LIST_UPLOADS = "ListMultipartUploads"
PUT_TAGS = "PutObjectTagging"
GET_TAGS = "GetObjectTagging"
CHECKSUM = "ChecksumCRC32"  # the x-amz-checksum-* headers of CreateMultipartUpload and UploadPart
HEAD_BUCKET = "HeadBucket"

_EFFECTS = {
    LIST_UPLOADS: "stale multipart uploads are not cleaned up (a bucket lifecycle rule can)",
    PUT_TAGS: "multipart objects carry no SHA-256 tag: after a crash before the database write, "
    "such a video is uploaded again",
    GET_TAGS: "stored multipart objects are not recognised: after a crash before the database "
    "write, such a video is uploaded again",
    CHECKSUM: "parts are sent without a CRC32 checksum",
    HEAD_BUCKET: "the storage check reads a missing key instead of asking for the bucket",
}

# Answers that mean "this store, or these credentials, do not offer that call", for good.
REFUSAL_STATUSES = frozenset({400, 403, 405, 501})
REFUSAL_CODES = frozenset(
    {
        "NotImplemented",
        "AccessDenied",
        "InvalidRequest",
        "InvalidArgument",
        "MethodNotAllowed",
        "NotSupported",
        "UnsupportedOperation",
    }
)
# 400 and 403 answers that say nothing about the call itself, only about this moment (a slow
# socket, a skewed clock, credentials being rotated, throttling): never remembered.
PASSING_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "RequestExpired",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidToken",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
    }
)
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# Read by check() when HeadBucket is refused; nothing ever writes it.
CHECK_KEY_NAME = ".seedance-archiver-check"


def refusal(exc: botocore.exceptions.ClientError) -> str | None:
    """Why the store refused an optional call for good ("NotImplemented 501 ..."), or None when
    the failure is transient (5xx other than 501, throttling, a timeout) and worth trying again."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = _status(exc)
    if code in PASSING_CODES:
        return None
    if status in REFUSAL_STATUSES or code in REFUSAL_CODES:
        message = str(exc.response.get("Error", {}).get("Message", "")).strip()
        words = [code, str(status or ""), message]
        return " ".join(dict.fromkeys(word for word in words if word))  # HEAD: "403 Forbidden"
    return None


def _status(exc: botocore.exceptions.ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


# Connections per client: more than the archive's threads, so no archive thread waits for a connection.
MAX_POOL_CONNECTIONS = archive.ARCHIVE_IO_THREADS + 4


def s3_client(**kwargs: Any) -> S3Client:
    """A boto3 S3 client as the archive needs it; ``kwargs`` go to ``boto3.client`` (an endpoint,
    credentials), the rest comes from boto3's own chain (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID...)."""
    return boto3.client(
        "s3",
        config=botocore.config.Config(
            max_pool_connections=MAX_POOL_CONNECTIONS,
            retries={"mode": "standard", "max_attempts": 3},
            # Checksums where we ask for them (multipart parts, as the aws CLI sends them), not on
            # every request: some S3-compatible stores reject botocore's defaults.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # SigV4 everywhere, presigned links too: R2 and other S3-compatible stores refuse
            # SigV2, which botocore otherwise signs links with for a custom endpoint.
            signature_version="s3v4",
        ),
        **kwargs,
    )


class S3Archive:
    """Videos in an S3 bucket: ``s3://{bucket}/{prefix}/{task_id}.mp4``.

    Endpoint and credentials come from boto3's own chain (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...).
    The SHA-256 is kept in the object's metadata (single PUT) or tags (multipart, where it is known
    only at the end); an object without it is written again while its link works, and read back to
    hash it before a task is given up (``find(read_back=True)``).

    Archiving needs only HeadObject, GetObject, PutObject and the multipart calls. Everything else
    (listing uploads, tags, checksum headers, HeadBucket) is best effort: when the store refuses one
    (501, 403, 405, 400), that is logged once, counted in ``storage_refusals`` and remembered in
    :attr:`refused`, and the call is not sent again by this instance.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        client: S3Client | None = None,
        *,
        meters: metrics.Metrics | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client: S3Client = client or s3_client()
        self.metrics = meters or metrics.Metrics()
        self._executor = executor or archive.default_executor()
        #: The optional calls this store refused, with the reason: never sent again.
        self.refused: dict[str, str] = {}
        self._head_403_seen = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        meters: metrics.Metrics | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> S3Archive:
        """The bucket and prefix of ``s3://bucket/prefix``, with the default client."""
        parts = urllib.parse.urlsplit(url)
        return cls(parts.netloc, parts.path.strip("/"), meters=meters, executor=executor)

    def key(self, task_id: str) -> str:
        name = f"{task_id}.mp4"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _unreachable(self, exc: botocore.exceptions.BotoCoreError) -> str:
        return unreachable(exc, self.client.meta.endpoint_url)

    def link(self, uri: str, expires_seconds: int) -> str:
        """A presigned GET URL (SigV4) of the object ``uri``, signed with this store's client."""
        parts = urllib.parse.urlsplit(uri)
        try:
            return str(
                self.client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": parts.netloc, "Key": parts.path[1:]},
                    ExpiresIn=expires_seconds,
                )
            )
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(f"cannot sign a link: {self._unreachable(exc)}") from exc
        except botocore.exceptions.ClientError as exc:
            raise errors.ArchiveError(f"cannot sign a link: {_s3_reason(exc)}") from exc

    # --- calls -------------------------------------------------------------------------------------

    async def _run(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        return await archive.run(self._executor, method, **kwargs)

    async def _call(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        """A call on the critical path: any failure is an ArchiveError."""
        try:
            return await self._run(method, **kwargs)
        except botocore.exceptions.ClientError as exc:
            raise errors.ArchiveError(f"S3 refused the upload: {_s3_reason(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(self._unreachable(exc)) from exc

    async def _optional(
        self, call: str, method: Callable[..., Any], **kwargs: Any
    ) -> dict[str, Any] | None:
        """A best-effort call: its answer, or None when it was refused (now or before) or failed."""
        if call in self.refused:
            return None
        try:
            answer: dict[str, Any] = await self._run(method, **kwargs)
        except botocore.exceptions.ClientError as exc:
            reason = refusal(exc)
            if reason is not None:
                self._refuse(call, reason)
            else:
                log.warning("storage_call_failed", call=call, error=_s3_reason(exc))
            return None
        except botocore.exceptions.BotoCoreError as exc:
            log.warning("storage_call_failed", call=call, error=type(exc).__name__)
            return None
        return answer

    async def _with_checksum(self, call: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        """A critical call with ``ChecksumAlgorithm="CRC32"``, or without it where the store refuses
        the checksum. Only a retry without it that succeeds proves the checksum was the problem."""
        if CHECKSUM in self.refused:
            return await self._call(method, **kwargs)
        try:
            return await self._run(method, ChecksumAlgorithm="CRC32", **kwargs)
        except botocore.exceptions.ClientError as exc:
            reason = refusal(exc)
            if reason is None:
                raise errors.ArchiveError(f"S3 refused the upload: {_s3_reason(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(self._unreachable(exc)) from exc
        body = kwargs.get("Body")
        if isinstance(body, _PartBody):
            body.seek(0)  # the refused attempt may have read some of it
        answer = await self._call(method, **kwargs)
        self._refuse(CHECKSUM, f"{call}: {reason}")
        return answer

    def _refuse(self, call: str, reason: str) -> None:
        if call in self.refused:
            return
        self.refused[call] = reason
        log.warning(
            "storage_feature_refused",
            call=call,
            reason=reason,
            effect=_EFFECTS[call],
            bucket=self.bucket,
        )
        self.metrics.storage_refusals.labels(call=call).inc()

    # --- the archive ---------------------------------------------------------------------------------

    async def find(self, task_id: str, *, read_back: bool = False) -> archive.Stored | None:
        key = self.key(task_id)
        try:
            head = await self._run(self.client.head_object, Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in NOT_FOUND_CODES:
                return None
            if _status(exc) == 403:
                # AWS answers a missing object with 403, not 404, unless the caller may also
                # s3:ListBucket, which the least-privilege policy leaves out. Taking it for "not
                # archived" costs at most one upload; real trouble with the credentials shows there.
                if not self._head_403_seen:
                    self._head_403_seen = True
                    log.info(
                        "object_head_forbidden",
                        key=key,
                        reason=_s3_reason(exc),
                        effect="treated as not archived (without s3:ListBucket a missing object "
                        "answers 403)",
                    )
                return None
            raise errors.ArchiveError(f"S3 HEAD failed: {_s3_reason(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(self._unreachable(exc)) from exc
        sha = head.get("Metadata", {}).get("sha256")
        if not sha:
            tags = await self._optional(
                GET_TAGS, self.client.get_object_tagging, Bucket=self.bucket, Key=key
            )
            if tags is not None:
                sha = next(
                    (t["Value"] for t in tags.get("TagSet", []) if t["Key"] == "sha256"), None
                )
        if sha:
            return archive.Stored(self._uri(key), int(head["ContentLength"]), sha)
        if not read_back:
            return None
        size, sha = await self._read_back(key)
        log.info("object_read_back", key=key, bytes=size, why="its SHA-256 was not recorded")
        return archive.Stored(self._uri(key), size, sha)

    async def _read_back(self, key: str) -> tuple[int, str]:
        """The size and SHA-256 of the object at ``key``, read whole (GetObject), in constant
        memory."""

        def read() -> tuple[int, str]:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            counter = archive.Counter()
            try:
                for chunk in body.iter_chunks(archive.HASH_READ_BYTES):
                    counter.add(chunk)
            finally:
                body.close()
            return counter.size, counter.hash.hexdigest()

        try:
            found: tuple[int, str] = await self._run(read)
        except botocore.exceptions.ClientError as exc:
            raise errors.ArchiveError(f"S3 GET failed: {_s3_reason(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(self._unreachable(exc)) from exc
        return found

    async def put(
        self,
        task_id: str,
        chunks: AsyncIterator[bytes],
        expected_size: int | None,
        metadata: Mapping[str, str] | None = None,
        *,
        leftovers: bool = True,
    ) -> archive.Stored:
        key = self.key(task_id)
        described = dict(metadata or {})
        counter = archive.Counter()
        part_bytes = part_size(expected_size)
        # Each part is filled in a buffer of its own, reused once S3 has it: at most
        # PARTS_IN_FLIGHT uploading and one filling, so the transfer's memory is fixed.
        free: list[bytearray] = []
        filling: bytearray | None = None
        filled = 0
        # A video announced smaller than a part goes up in one PUT, from a buffer of its own size
        # (and a byte, so the whole video never reads as a full part): zero-filling a part's 8 MiB
        # for each 2 MB video was a seventh of the daemon's CPU on S3 (bench/burst.py). The video
        # cannot outgrow it: the transport reads no more than the Content-Length.
        first_bytes = part_bytes if expected_size is None else min(part_bytes, expected_size + 1)
        upload_id: str | None = None
        # Up to PARTS_IN_FLIGHT parts upload while the download goes on; the download waits only
        # when all are busy.
        slots = asyncio.Semaphore(PARTS_IN_FLIGHT)
        uploads: list[asyncio.Task[dict[str, Any]]] = []
        try:
            async for chunk in chunks:
                counter.add(chunk)
                rest = memoryview(chunk)
                while rest:
                    if filling is None:
                        fresh = first_bytes if upload_id is None else part_bytes
                        filling, filled = (free.pop() if free else bytearray(fresh)), 0
                    taken = min(len(rest), len(filling) - filled)
                    filling[filled : filled + taken] = rest[:taken]
                    filled += taken
                    rest = rest[taken:]
                    if filled < len(filling):
                        continue
                    if upload_id is None:
                        # A dead attempt's multipart uploads of this key go first (Archive.put);
                        # a single PUT meets none, and leaves them to housekeeping.
                        if leftovers:
                            await self.discard_incomplete(task_id)
                        # As the aws CLI does: each part carries its CRC32, so the store can
                        # check parts as they come instead of re-reading the whole object at
                        # completion (11 s of 18 for 1 GiB on moto; bench/README.md).
                        created = await self._with_checksum(
                            "CreateMultipartUpload",
                            self.client.create_multipart_upload,
                            Bucket=self.bucket,
                            Key=key,
                            ContentType="video/mp4",
                            Metadata=described,
                        )
                        upload_id = created["UploadId"]
                    await slots.acquire()
                    _raise_failed(uploads)
                    uploads.append(
                        asyncio.create_task(
                            self._upload_part(
                                key, upload_id, len(uploads) + 1, filling, filled, slots, free
                            )
                        )
                    )
                    filling = None
            counter.verify(expected_size)
            sha = counter.hash.hexdigest()
            if upload_id is None:
                await self._call(
                    self.client.put_object,
                    Bucket=self.bucket,
                    Key=key,
                    Body=b"" if filling is None else _PartBody(filling, filled),
                    ContentType="video/mp4",
                    Metadata=described | {"sha256": sha},
                )
            else:
                if filling is not None:
                    await slots.acquire()
                    uploads.append(
                        asyncio.create_task(
                            self._upload_part(
                                key, upload_id, len(uploads) + 1, filling, filled, slots, free
                            )
                        )
                    )
                parts = [await upload for upload in uploads]
                await self._call(
                    self.client.complete_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
                upload_id = None
                # The object is complete either way and the database records the hash; without
                # the tag, a crash before that database write means one more upload later.
                await self._optional(
                    PUT_TAGS,
                    self.client.put_object_tagging,
                    Bucket=self.bucket,
                    Key=key,
                    Tagging={"TagSet": [{"Key": "sha256", "Value": sha}]},
                )
        except BaseException:
            # Let parts already on the wire finish first (at most PARTS_IN_FLIGHT): S3 may keep a
            # part that was still uploading when the upload was aborted.
            await asyncio.shield(asyncio.gather(*uploads, return_exceptions=True))
            if upload_id is not None:
                await self._abort(key, upload_id)
            raise
        return archive.Stored(self._uri(key), counter.size, sha)

    async def _upload_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        buffer: bytearray,
        size: int,
        slots: asyncio.Semaphore,
        free: list[bytearray],
    ) -> dict[str, Any]:
        """Upload the first ``size`` bytes of ``buffer`` as part ``number``; then ``buffer`` goes
        back to ``free`` for the next part. After a failure it does not: the put is over, and a
        thread botocore was retrying in may still be reading it."""
        try:
            answer = await self._with_checksum(
                "UploadPart",
                self.client.upload_part,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=_PartBody(buffer, size),
            )
        finally:
            slots.release()
        free.append(buffer)
        part = {"PartNumber": number, "ETag": answer["ETag"]}
        if answer.get("ChecksumCRC32"):
            part["ChecksumCRC32"] = answer["ChecksumCRC32"]
        return part

    async def _abort(self, key: str, upload_id: str) -> None:
        loop = asyncio.get_running_loop()
        abort = functools.partial(
            self.client.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id
        )
        try:
            await asyncio.shield(loop.run_in_executor(self._executor, abort))
        except Exception as exc:
            # Housekeeping removes stale uploads later; the final key was never written.
            log.warning("multipart_abort_failed", key=key, error=str(exc))

    async def check(self) -> None:
        """Raise ArchiveError unless the bucket answers and takes our credentials.

        HeadBucket (s3:ListBucket on AWS) is optional: where it is refused, a GetObject of a key
        nobody writes tells the same. A GET, not a HEAD, because only a GET's error body tells a
        missing bucket (NoSuchBucket) from a missing key.
        """
        if HEAD_BUCKET not in self.refused:
            try:
                await self._run(self.client.head_bucket, Bucket=self.bucket)
                return
            except botocore.exceptions.ClientError as exc:
                if _status(exc) == 404 or exc.response.get("Error", {}).get("Code") in (
                    "404",
                    "NoSuchBucket",
                ):
                    raise errors.ArchiveError(
                        f"S3 bucket {self.bucket!r} not found: {_s3_reason(exc)}"
                    ) from exc
                reason = refusal(exc)
                if reason is not None:
                    self._refuse(HEAD_BUCKET, reason)
                else:
                    log.warning("storage_call_failed", call=HEAD_BUCKET, error=_s3_reason(exc))
            except botocore.exceptions.BotoCoreError as exc:
                raise errors.ArchiveError(self._unreachable(exc)) from exc
        await self._probe()

    async def _probe(self) -> None:
        key = f"{self.prefix}/{CHECK_KEY_NAME}" if self.prefix else CHECK_KEY_NAME
        try:
            answer = await self._run(
                self.client.get_object, Bucket=self.bucket, Key=key, Range="bytes=0-0"
            )
            answer["Body"].close()
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in NOT_FOUND_CODES:
                return  # reachable, the bucket exists and the credentials are good
            if code == "AccessDenied":
                # AWS without s3:ListBucket: the bucket exists and the key was accepted (a bad
                # key is InvalidAccessKeyId or SignatureDoesNotMatch); the next upload shows more.
                return
            raise errors.ArchiveError(f"S3 check failed: {_s3_reason(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(self._unreachable(exc)) from exc

    def _task_of(self, key: str) -> str | None:
        head = f"{self.prefix}/" if self.prefix else ""
        if not key.startswith(head) or not key.endswith(".mp4"):
            return None
        name = key[len(head) : -len(".mp4")]
        return name if name and "/" not in name else None

    async def _uploads(self, prefix: str) -> list[dict[str, Any]] | None:
        """The open multipart uploads under ``prefix``, or None where they cannot be listed."""
        uploads: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            page = await self._optional(LIST_UPLOADS, self.client.list_multipart_uploads, **kwargs)
            if page is None:
                return None
            uploads.extend(page.get("Uploads", []))
            if not page.get("IsTruncated"):
                return uploads
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker")

    async def incomplete(self) -> set[str]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        found = (self._task_of(u["Key"]) for u in await self._uploads(prefix) or [])
        return {task_id for task_id in found if task_id}

    async def discard_incomplete(
        self, task_id: str, started_before: dt.datetime | None = None
    ) -> int:
        key = self.key(task_id)
        removed = 0
        for upload in await self._uploads(key) or []:
            if upload["Key"] != key:
                continue
            if started_before is not None and upload["Initiated"] >= started_before:
                continue
            try:
                await self._call(
                    self.client.abort_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload["UploadId"],
                )
                removed += 1
            except errors.ArchiveError as exc:
                log.warning("stale_upload_abort_failed", key=key, error=str(exc))
        return removed


def _raise_failed(uploads: list[asyncio.Task[dict[str, Any]]]) -> None:
    """Stop the stream early if a part upload already failed."""
    for upload in uploads:
        if upload.done() and not upload.cancelled() and upload.exception() is not None:
            raise upload.exception()  # type: ignore[misc]


def unreachable(exc: botocore.exceptions.BotoCoreError, endpoint: str | None) -> str:
    """Why S3 could not be asked, naming the cause and the endpoint: no credentials, an endpoint
    that cannot be reached, a timeout (never a secret: credentials are not in an endpoint URL)."""
    where = _without_query(endpoint) if endpoint else "the default AWS endpoint"
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return (
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE), or run with an instance role"
        )
    if isinstance(
        exc, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.ReadTimeoutError
    ):
        return f"S3 endpoint {where} timed out"
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return f"cannot reach the S3 endpoint {where} (set AWS_ENDPOINT_URL_S3 for another)"
    return f"S3 unreachable at {where}: {type(exc).__name__}"


def _without_query(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return (
        urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
        if (parts.username or parts.password or parts.query)
        else url
    )


def _s3_reason(exc: botocore.exceptions.ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', '?')} {error.get('Message', '')}".strip()
