"""The trigger tier (`jobworker trigger`, the seed's server-batch): schedules → orchestrator.

`ticks` is the pure core (what is due, what to record); `runner` works one schedule while this
replica holds its lease; `replica` holds leases and runners; `orchestrator_client` submits;
`by_hand` runs triggers and backfills asked for by people; `service` is the gRPC API;
`explain` turns the decision ledger into sentences; `main` composes it all.
"""
