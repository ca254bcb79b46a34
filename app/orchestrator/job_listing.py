"""ListJobs' walk of the job index: bounded pages of entries and their records, filtered.

A call looks at no more than `max_examined` index entries (a filter that matches little would
otherwise read every record there is), reading them `read_page` at a time (one range read and
one MGET each), and ends its page at `query.limit` jobs or at `MAX_PAGE_BYTES` of records. The
position it stopped at comes back for the next call to go on from.
"""

from __future__ import annotations

import msgspec

from app.fleet.batch_job import BatchJob, encode_job
from app.fleet.job_index import IndexPosition, JobQuery, advance, matches
from app.stores.abc import JobStore

#: Index entries one call looks at, at most.
MAX_EXAMINED = 2000
#: Index entries read per round trip.
READ_PAGE = 250
#: Records one answer holds, encoded, before its page ends (gRPC's default message limit is 4 MiB).
MAX_PAGE_BYTES = 2 * 1024 * 1024


class JobPage(msgspec.Struct, frozen=True, kw_only=True):
    """What one call found: jobs newest first, where to go on (None: the index holds no more),
    and how many index entries it looked at."""

    jobs: list[BatchJob]
    next: IndexPosition | None
    examined: int


async def list_jobs(
    store: JobStore,
    query: JobQuery,
    *,
    max_examined: int = MAX_EXAMINED,
    read_page: int = READ_PAGE,
    max_bytes: int = MAX_PAGE_BYTES,
) -> JobPage:
    """The jobs of the index that `query` asks for, from `query.after` on (see the module)."""
    position = query.after
    found: list[BatchJob] = []
    size = examined = 0
    while examined < max_examined:
        want = min(read_page, max_examined - examined)
        entries = await store.index_page(
            after=position, since=query.since, until=query.until, count=want
        )
        for i, entry in enumerate(entries):
            job = entry.job
            if job is not None and matches(query, job):
                cost = len(encode_job(job))
                if found and size + cost > max_bytes:
                    return JobPage(jobs=found, next=position, examined=examined)
                found.append(job)
                size += cost
            examined += 1
            position = advance(position, entry.score)
            if len(found) >= query.limit:
                more = i + 1 < len(entries) or len(entries) == want
                return JobPage(jobs=found, next=position if more else None, examined=examined)
        if len(entries) < want:
            return JobPage(jobs=found, next=None, examined=examined)
    return JobPage(jobs=found, next=position, examined=examined)
