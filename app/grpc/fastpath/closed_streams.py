"""How many closed streams an HTTP/2 connection remembers: fewer than h2's 65,536.

h2 remembers up to 65,536 closed stream ids per connection (to tell a late frame for a closed
stream from a protocol error); at gRPC request rates that is ~12 MiB per busy connection, kept
for good. A few thousand ids is ample for late frames. The limit is set on one connection at a
time (`limit_closed_streams`), never on h2's class, so that connections made by others in the
process (a library's own client) keep h2's default: the fast path's server connections and the
orchestrator's channels to its workers (one RunWork per job) use it.
"""

from __future__ import annotations

from h2.connection import H2Connection
from h2.utilities import SizeLimitDict

MAX_CLOSED_STREAMS = 4096


def limit_closed_streams(h2c: H2Connection, limit: int = MAX_CLOSED_STREAMS) -> None:
    """Make `h2c` remember at most `limit` closed streams.

    h2 reads the class attribute MAX_CLOSED_STREAMS once, in `__init__`, to size the dict it
    keeps them in; for one connection, that dict is rebuilt with the new size (it is still empty
    when the protocol has just made the connection) and the attribute is set on the instance.
    """
    h2c.MAX_CLOSED_STREAMS = limit
    closed = SizeLimitDict(size_limit=limit)
    closed.update(h2c._closed_streams)
    h2c._closed_streams = closed
