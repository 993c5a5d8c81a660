"""The archive's behaviour, once, over every store: the fake, a folder, and S3 (moto over HTTP).

Each store comes with the two things only it knows how to do from outside: read the bytes a link
names, and leave an upload unfinished as a killed process would.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import pathlib
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from seedance_archiver import archive, errors, simulator, testing, utils
from seedance_archiver.archive import Stored, folder, s3

PREFIX = "videos"
SMALL = 64 * 1024
# More than one S3 part: a put that breaks after it has an open multipart upload to abort.
PAST_ONE_PART = s3.PART_BYTES + 4096


@dataclasses.dataclass
class Store:
    """One archive store, with how to read a link of it and how to leave an upload unfinished."""

    archive: archive.Archive
    read_link: Callable[[str], bytes]
    leave_unfinished: Callable[[str], None]

    async def put_whole(self, task_id: str, data: bytes) -> Stored:
        """Put ``data`` as ``task_id``'s video, and check that find and a link give all of it back."""
        put = await self.archive.put(task_id, stream(data), len(data))
        assert (put.size, put.sha256) == stored_as(data)
        assert await self.archive.find(task_id) == put
        assert self.read_link(self.archive.link(put.uri, archive.LINK_SECONDS)) == data
        return put


def _fake() -> Store:
    fake = testing.FakeArchive()

    def read_link(link: str) -> bytes:
        task_id = urllib.parse.urlsplit(link).netloc.removesuffix(".mp4")
        return fake.objects[task_id]

    return Store(fake, read_link, fake.leave_unfinished)


def _folder(root: pathlib.Path) -> Store:
    def leave_unfinished(task_id: str) -> None:
        incoming = root / folder.INCOMING_DIR
        incoming.mkdir(parents=True, exist_ok=True)
        (incoming / f"{task_id}.{uuid.uuid4().hex}.part").write_bytes(b"half a video")

    return Store(
        folder.FileArchive(root), lambda link: pathlib.Path(link).read_bytes(), leave_unfinished
    )


def _s3(bucket: str, client: Any) -> Store:
    store = s3.S3Archive(bucket, PREFIX)

    def read_link(link: str) -> bytes:
        answer = httpx.get(link, timeout=10)
        answer.raise_for_status()
        return answer.content

    def leave_unfinished(task_id: str) -> None:
        client.create_multipart_upload(Bucket=bucket, Key=store.key(task_id))

    return Store(store, read_link, leave_unfinished)


@pytest.fixture(params=["fake", "folder", "s3"])
def any_archive(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[Store]:
    """The same archive behaviour on the fake archive, a folder and S3."""
    if request.param == "fake":
        yield _fake()
    elif request.param == "folder":
        yield _folder(tmp_path / "archive")
    else:
        yield _s3(request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_client"))


def new_id() -> str:
    return f"video_{uuid.uuid4().hex[:10]}"


def video(task_id: str, size: int) -> bytes:
    return b"".join(simulator.video_chunks(task_id, size))


async def stream(data: bytes, breaks_with: BaseException | None = None) -> AsyncIterator[bytes]:
    """``data`` as a download delivers it, in chunks; then, with ``breaks_with``, a broken one."""
    for start in range(0, len(data), 1024 * 1024):
        yield data[start : start + 1024 * 1024]
    if breaks_with is not None:
        raise breaks_with


def stored_as(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


class TestPutAndFind:
    """A put commits the whole stream; find then gives the same place, size and SHA-256."""

    @pytest.mark.parametrize("announced", [True, False], ids=["size-known", "size-unknown"])
    async def test_put_then_find(self, any_archive: Store, announced: bool) -> None:
        task_id = new_id()
        data = video(task_id, SMALL)
        put = await any_archive.archive.put(task_id, stream(data), len(data) if announced else None)
        assert (put.size, put.sha256) == stored_as(data)
        assert await any_archive.archive.find(task_id) == put
        assert await any_archive.archive.find(task_id, read_back=True) == put

    async def test_a_missing_video_is_none(self, any_archive: Store) -> None:
        assert await any_archive.archive.find(new_id()) is None
        assert await any_archive.archive.find(new_id(), read_back=True) is None

    async def test_a_video_of_several_parts(self, any_archive: Store) -> None:
        task_id = new_id()
        await any_archive.put_whole(task_id, video(task_id, PAST_ONE_PART))

    async def test_a_second_put_replaces_the_first_whole(self, any_archive: Store) -> None:
        task_id = new_id()
        await any_archive.put_whole(task_id, video("first", SMALL))
        await any_archive.put_whole(task_id, video("second", SMALL // 2))

    async def test_the_link_reads_back_the_bytes(self, any_archive: Store) -> None:
        task_id = new_id()
        await any_archive.put_whole(task_id, video(task_id, SMALL))

    async def test_a_writable_store_passes_its_check(self, any_archive: Store) -> None:
        await any_archive.archive.check()


class TestNothingHalfWritten:
    """A put that fails leaves nothing findable, and an earlier video untouched."""

    @pytest.mark.parametrize("size", [SMALL, PAST_ONE_PART], ids=["small", "past-one-part"])
    async def test_a_stream_that_breaks_leaves_nothing(self, any_archive: Store, size: int) -> None:
        task_id = new_id()
        broken = errors.DownloadError("the download broke off")
        with pytest.raises(errors.DownloadError, match="broke off"):
            await any_archive.archive.put(task_id, stream(video(task_id, size), broken), None)
        assert await any_archive.archive.find(task_id, read_back=True) is None
        assert await any_archive.archive.incomplete() == set()

    @pytest.mark.parametrize("size", [SMALL, PAST_ONE_PART], ids=["small", "past-one-part"])
    async def test_a_stream_shorter_than_announced_leaves_nothing(
        self, any_archive: Store, size: int
    ) -> None:
        task_id = new_id()
        said = f"truncated download: got {size} bytes, Content-Length said {size + 1}"
        with pytest.raises(errors.DownloadError, match=said):
            await any_archive.archive.put(task_id, stream(video(task_id, size)), size + 1)
        assert await any_archive.archive.find(task_id, read_back=True) is None
        assert await any_archive.archive.incomplete() == set()

    async def test_a_stream_longer_than_announced_leaves_nothing(self, any_archive: Store) -> None:
        task_id = new_id()
        with pytest.raises(errors.DownloadError):
            await any_archive.archive.put(task_id, stream(video(task_id, SMALL + 1)), SMALL)
        assert await any_archive.archive.find(task_id, read_back=True) is None
        assert await any_archive.archive.incomplete() == set()

    async def test_a_failed_put_keeps_the_earlier_video(self, any_archive: Store) -> None:
        task_id = new_id()
        data = video(task_id, SMALL)
        first = await any_archive.archive.put(task_id, stream(data), len(data))
        broken = errors.DownloadError("the download broke off")
        with pytest.raises(errors.DownloadError):
            await any_archive.archive.put(task_id, stream(video("other", SMALL), broken), None)
        assert await any_archive.archive.find(task_id) == first
        link = any_archive.archive.link(first.uri, archive.LINK_SECONDS)
        assert any_archive.read_link(link) == data


class TestUnfinished:
    """An upload a killed process left is listed, never found, and discarded only if old enough."""

    async def test_listed_and_not_found(self, any_archive: Store) -> None:
        task_id = new_id()
        any_archive.leave_unfinished(task_id)
        assert await any_archive.archive.incomplete() == {task_id}
        assert await any_archive.archive.find(task_id, read_back=True) is None

    async def test_discarded_when_begun_before_the_check(self, any_archive: Store) -> None:
        task_id, other = new_id(), new_id()
        any_archive.leave_unfinished(task_id)
        any_archive.leave_unfinished(other)
        after = utils.utcnow() + dt.timedelta(minutes=1)
        assert await any_archive.archive.discard_incomplete(task_id, started_before=after) == 1
        assert await any_archive.archive.incomplete() == {other}
        assert await any_archive.archive.discard_incomplete(other) == 1
        assert await any_archive.archive.incomplete() == set()

    async def test_a_put_removes_what_its_task_s_dead_attempt_left(
        self, any_archive: Store
    ) -> None:
        """The put is made under the task's lease: an unfinished upload of the task is a dead
        attempt's, and goes (at S3, before a multipart upload: this video is past one part);
        another task's is left for housekeeping."""
        task_id, other = new_id(), new_id()
        any_archive.leave_unfinished(task_id)
        any_archive.leave_unfinished(other)
        await any_archive.put_whole(task_id, video(task_id, PAST_ONE_PART))
        assert await any_archive.archive.incomplete() == {other}

    async def test_a_put_told_of_no_dead_attempt_leaves_uploads_to_housekeeping(
        self, any_archive: Store
    ) -> None:
        """A put for a task no earlier attempt worked on (``leftovers=False``) spares the listing
        (a folder's, S3's uploads, past one part): what lies there all the same stays, for
        housekeeping, and the video is stored whole beside it."""
        task_id = new_id()
        any_archive.leave_unfinished(task_id)
        data = video(task_id, PAST_ONE_PART)
        put = await any_archive.archive.put(task_id, stream(data), len(data), leftovers=False)
        assert (put.size, put.sha256) == stored_as(data)
        assert await any_archive.archive.find(task_id) == put
        assert await any_archive.archive.incomplete() == {task_id}
        assert await any_archive.archive.discard_incomplete(task_id) == 1

    async def test_an_upload_begun_after_the_check_is_kept(
        self, any_archive: Store, request: pytest.FixtureRequest
    ) -> None:
        if request.node.callspec.params["any_archive"] == "s3":
            # tests/integration/test_s3_compat.py checks it on servers that tell the time.
            pytest.skip("moto lists every upload as Initiated 2010-11-10 (moto/s3/responses.py)")
        task_id = new_id()
        any_archive.leave_unfinished(task_id)
        before = utils.utcnow() - dt.timedelta(minutes=1)
        assert await any_archive.archive.discard_incomplete(task_id, started_before=before) == 0
        assert await any_archive.archive.incomplete() == {task_id}
