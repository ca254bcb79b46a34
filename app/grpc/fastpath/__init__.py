"""The gRPC fast path: everything that builds on grpclib's, h2's and betterproto2's internals.

`server.py` (a lean path for unary calls), `codec.py` (upb for betterproto2 messages), `probe.py`
(the internals they rely on, checked at start-up) and `install.py` (the explicit install step,
falling back to grpclib's own server). Importing any of them changes nothing in grpclib or h2.
"""
