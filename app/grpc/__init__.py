"""The gRPC edge (grpclib): the server adapter with health and reflection, and the port choice.

`fastpath/` holds everything that builds on grpclib's or h2's internals, behind one switch.
"""
