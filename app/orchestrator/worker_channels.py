"""One pooled grpclib channel per worker address, with HTTP/2 keepalive to notice silent peers."""

from __future__ import annotations

from grpclib.client import Channel
from grpclib.config import Configuration


class WorkerChannels:
    """Channels by `host:port`, made on first use and closed together."""

    def __init__(
        self, *, keepalive_seconds: float = 2.0, keepalive_timeout_seconds: float = 3.0
    ) -> None:
        # pings go out during a long call (no data flows while a job runs) and a peer that does
        # not answer within the timeout has its connection closed, failing the call at once
        self._config = Configuration(
            _keepalive_time=keepalive_seconds,
            _keepalive_timeout=keepalive_timeout_seconds,
            _keepalive_permit_without_calls=False,
            _http2_max_pings_without_data=0,
            _http2_min_sent_ping_interval_without_data=keepalive_seconds,
        )
        self._channels: dict[str, Channel] = {}

    def __repr__(self) -> str:
        return f"<WorkerChannels {len(self._channels)} open>"

    def get(self, address: str) -> Channel:
        channel = self._channels.get(address)
        if channel is None:
            host, _, port = address.rpartition(":")
            channel = Channel(host, int(port), config=self._config)
            self._channels[address] = channel
        return channel

    def drop(self, address: str) -> None:
        """Close the channel to a worker that is gone (the next call reconnects)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
