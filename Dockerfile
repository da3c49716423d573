# The relay worker image (also carries the CLI).
FROM python:3.11-slim
# the bundled effects drive git in the workspaces the workers see
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY workflows ./workflows
COPY activities ./activities
COPY worker ./worker
RUN pip install --no-cache-dir '.[postgres]'
USER nobody
CMD ["relay", "worker"]
