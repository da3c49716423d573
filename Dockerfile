# The relay worker image (also carries the CLI).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY workflows ./workflows
COPY activities ./activities
COPY worker ./worker
RUN pip install --no-cache-dir '.[postgres]'
USER nobody
CMD ["relay", "worker"]
