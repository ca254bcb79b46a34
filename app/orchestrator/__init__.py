"""The orchestrator role (the seed's server-cloud gateway): validate, queue, balance, delegate.

`main` is the composition root; `service` answers the gRPC API; `dispatcher` takes jobs off the
queue and drives each to its end on some worker; `directory` is the fleet as read from the
registry; `worker_client` is the edge to the workers (grpclib, and an in-process twin).
"""
