"""The reseller's API, the one the seed page documents: ``GET {base}/v1/result/{id}``.

A task moves ``queued -> processing -> completed | failed | cancelled``; the answer's fields already
have our names (``created``, ``video_url``, ``actualDuration``, ``error`` as text). It knows no
deadline of its own: the task and its video live a day from ``created`` (SEEDANCE_RETENTION_SECONDS).
"""

from __future__ import annotations

from seedance_archiver import models, provider
from seedance_archiver.providers import fields, http

NAME = "reseller"
DEFAULT_BASE_URL = "https://zcbservice.aizfw.cn/kyyReactApiServer"


def parse_answer(task_id: str, body: bytes) -> models.Answer:
    """Parse the provider's JSON for ``task_id``.

    Strict where a wrong reading would lose a video: ``id`` must be the asked-for one, ``status`` one
    of the seed's, and a completed task's ``video_url`` whole and usable (else MalformedAnswer). The
    rest is read leniently (:class:`fields.Lenient`): a drifted side field is ignored and noted,
    never a reason not to archive. Strings come out storable.
    """
    payload = fields.json_object(body)
    answer_id = fields.answer_id(payload, task_id)
    raw_status = fields.status_text(payload)
    try:
        status = models.Status(raw_status)
    except ValueError:
        raise fields.unknown_status(raw_status) from None
    video_url = fields.link(payload, "video_url") if status is models.Status.COMPLETED else None
    read = fields.Lenient()
    return models.Answer(
        id=answer_id,
        status=status,
        created=read.time(payload, "created"),
        model=read.text(payload, "model", fields.MODEL_MAX_CHARS),
        video_url=video_url,
        actual_duration=read.number(payload, "actualDuration"),
        error=read.reason(payload, "error"),
        ignored=tuple(read.ignored),
    )


class Reseller(http.Dialect):
    """The reseller's dialect for :class:`http.HttpProvider`: the common contract, all of it (a GET
    with a Bearer key, its JSON 404, open signed links refused with 403, 404 or 410)."""

    name = NAME
    tasks_path = "/v1/result/"

    def parse(self, task_id: str, body: bytes) -> models.Answer:
        return parse_answer(task_id, body)


DIALECT = Reseller()
PROVIDER = provider.Spec(name=NAME, default_base_url=DEFAULT_BASE_URL, build=http.factory(DIALECT))
