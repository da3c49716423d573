# The relay worker image (also carries the CLI).
FROM python:3.11-slim
# the bundled effects drive git in the workspaces the workers see; checks (model-written code)
# run in a bubblewrap sandbox. bwrap needs user namespaces, mount and a fresh /proc inside the
# container: run the worker with seccomp, apparmor and systempaths unconfined (docker-compose.yml
# does), or relay refuses to run checks (RELAY_UNSANDBOXED_CHECKS=1 opts out, unsandboxed).
RUN apt-get update && apt-get install -y --no-install-recommends git bubblewrap \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY workflows ./workflows
COPY activities ./activities
COPY worker ./worker
RUN pip install --no-cache-dir '.[postgres]'
USER nobody
CMD ["relay", "worker"]
