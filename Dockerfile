# The job worker image: wheels built in one stage, installed into a slim runtime in the next.
#
#   docker build -t job-worker-app .
#   docker run --rm -e REDIS_URL=redis://valkey:6379/0 -p 9091:9091 job-worker-app
#
# Settings come from the environment only: PROFILE, REDIS_URL, JOBWORKER_<SECTION>__<KEY>
# (JOBWORKER_GRPC__PORT is the port, 9091 by default). No source tree reaches the final image:
# it holds a venv with the project's wheel and its dependencies, and nothing else of ours.
# On a machine without a container engine, see docs/deploy.md (buildah with chroot isolation).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the project's wheel and every dependency's wheel ----------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
# a venv rather than the image's pip: Debian-based stand-ins of the base image have no pip
RUN python3 -m venv /opt/build
WORKDIR /src
# the dependencies first, from pyproject.toml alone, so a change under app/ reuses this layer
COPY pyproject.toml README.md ./
RUN mkdir app && touch app/__init__.py \
 && /opt/build/bin/pip wheel --wheel-dir /wheels '.[fast]' \
 && rm /wheels/job_worker_app-*.whl
COPY app ./app
RUN rm -rf build *.egg-info \
 && /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels .

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="job-worker-app" \
      org.opencontainers.image.description="gRPC job worker (jobworker worker)"
# a fixed numeric uid, so that Kubernetes' runAsNonRoot can check it without a passwd lookup
RUN groupadd --system --gid 10001 jobworker \
 && useradd --system --uid 10001 --gid jobworker --home-dir /home/jobworker --create-home \
      --shell /usr/sbin/nologin jobworker
# the wheels come in through a bind mount, so they never become a layer of this image; pip
# and setuptools leave the venv once it is made, since nothing installs at run time
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m venv /opt/jobworker \
 && /opt/jobworker/bin/python -m pip install --no-index --find-links=/wheels \
      --no-cache-dir --disable-pip-version-check 'job-worker-app[fast]' \
 && /opt/jobworker/bin/python -m pip uninstall --yes --quiet pip setuptools \
 && /opt/jobworker/bin/jobworker --version
# PATH in full: an imported stand-in of the base image may not set one for $PATH to extend.
# REMEMBER_PORT off: a container's port is fixed by its config and its root may be read-only.
# EMBEDDED off: there is no redis-server to embed, so a missing REDIS_URL is a clear config
# error at start rather than a surprise.
ENV PATH=/opt/jobworker/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROFILE=local \
    JOBWORKER_GRPC__HOST=0.0.0.0 \
    JOBWORKER_GRPC__PORT=9091 \
    JOBWORKER_GRPC__REMEMBER_PORT=false \
    JOBWORKER_REDIS__EMBEDDED=false
USER 10001:10001
WORKDIR /home/jobworker
EXPOSE 9091
# the worker drains on SIGTERM (new work refused, running jobs finish within the grace) and
# exits 0; give `docker stop -t` more than worker.drain_grace_seconds
STOPSIGNAL SIGTERM
# shell form, so the port is read from the environment when the check runs
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD jobworker health --target "127.0.0.1:${JOBWORKER_GRPC__PORT}" --timeout 3 || exit 1
ENTRYPOINT ["jobworker"]
CMD ["worker"]
