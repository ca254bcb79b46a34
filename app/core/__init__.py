"""The shared kernel: clock, retry, circuit breaker, load balancer, outages.

Pure policies and small helpers that every role uses. Imports anyio and msgspec only (no
asyncio, grpclib, redis, nor any other package of `app` but `app.errors`); a test checks it.
"""
