"""The worker role (the seed's job-worker-app-demo): gRPC WorkerService over the JobMaster.

`main` is the composition root; `job_master` runs jobs on a capacity limiter with the seed's
executor semantics; `job_registry` and `builtin_jobs` name what can run; `service` is the gRPC
edge; `reporter` writes PodInfo to the registry every report interval.
"""
