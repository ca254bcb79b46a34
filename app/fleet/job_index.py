"""The job index: every job the orchestrators took, by submit time, for listing recent jobs.

A sorted set scored by `submitted_at` with the job id as member: one entry per job, added by the
submit script itself (one command on the hot path), removed once the job's record is gone (the
orchestrators trim it now and then, off the hot path). Listing walks it newest first in bounded
pages and reads the records to filter them. The pure parts of that walk are here: where a page
starts, whether a job matches, and the page token that says where the next one starts.
"""

from __future__ import annotations

import base64
import binascii
import math

import msgspec

from app.fleet.batch_job import BatchJob
from app.fleet.job_state import JobState

#: Jobs one page holds when the request names no limit, and at most.
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
#: A page token is short; anything longer is not one of ours (and is not decoded).
MAX_TOKEN_LENGTH = 200


class IndexPosition(msgspec.Struct, frozen=True, kw_only=True):
    """Where a newest-first walk of the index stands: past every entry scored above `score`,
    and past the first `skip` of those scored exactly `score` (entries of one score come in a
    fixed order: by member, descending, as Redis orders them)."""

    score: float
    skip: int


class IndexedJob(msgspec.Struct, frozen=True, kw_only=True):
    """One index entry as a store reads it: its score, and its job's record (None when the
    record is gone, or the entry or its record is junk: the store has said and counted that)."""

    score: float
    job: BatchJob | None


class JobQuery(msgspec.Struct, frozen=True, kw_only=True):
    """What a listing asks for. Times are Unix epoch seconds; `until` is exclusive."""

    states: frozenset[JobState] = frozenset()
    job_type: str = ""
    schedule: str = ""
    since: float = -math.inf
    until: float = math.inf
    limit: int = DEFAULT_LIMIT
    after: IndexPosition | None = None


def matches(query: JobQuery, job: BatchJob) -> bool:
    """Whether `job` is one the query asks for (the time bounds are the index's to apply)."""
    return (
        (not query.states or job.state in query.states)
        and (not query.job_type or job.job_type == query.job_type)
        and (not query.schedule or job.schedule == query.schedule)
    )


def advance(position: IndexPosition | None, score: float) -> IndexPosition:
    """The position just past an entry scored `score`, the next after `position`."""
    if position is not None and position.score == score:
        return IndexPosition(score=score, skip=position.skip + 1)
    return IndexPosition(score=score, skip=1)


def range_start(after: IndexPosition | None, until: float) -> tuple[float, bool, int]:
    """Where a page starts, as (the highest score, whether that score is included, how many of
    the entries there to skip): just past `after`, never at or above `until`."""
    if after is None or after.score >= until:
        return until, False, 0
    return after.score, True, after.skip


def encode_token(position: IndexPosition) -> str:
    """The page token for `position`: opaque to clients, URL-safe, no padding."""
    text = f"1:{position.score!r}:{position.skip}".encode()
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


def decode_token(token: str) -> IndexPosition:
    """The position a page token names; ValueError when it is not one `encode_token` made."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError("too long")
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not base64") from None
    version, _, rest = text.partition(":")
    score_text, _, skip_text = rest.rpartition(":")
    if version != "1" or not skip_text.isdigit():
        raise ValueError("not a position")
    score = float(score_text)  # ValueError for what is not a number
    skip = int(skip_text)
    if math.isnan(score) or skip > 10**9:
        raise ValueError("not a position")
    return IndexPosition(score=score, skip=skip)
