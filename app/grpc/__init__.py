"""The gRPC edge (grpclib): the server adapter with health and reflection, its codec, counters
and metrics, and the port choice.

`fastpath/` holds everything that builds on grpclib's or h2's internals, behind one switch
(`grpc.fast_path`) and a start-up probe that falls back to grpclib's own server.
"""
