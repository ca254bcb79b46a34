"""Shared state behind small interfaces: the pod registry, job records, the queue, job events.

`abc` holds the protocols, `memory` their in-memory twins, `redis/` the Redis implementations
(and the client and embedded server they run on).
"""
