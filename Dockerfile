# Atlas in a container: `docker build -t atlas .`, then
#   docker run -p 9000:9000 -v $PWD/atlas.toml:/etc/atlas/atlas.toml:ro atlas
# The config must listen on 0.0.0.0 (and give [admin] a token if the ops server does too).
# deploy/kubernetes/atlas.yaml runs this image; docs/operations.md ("Deployment") explains both.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY atlas ./atlas
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home atlas

USER 10001
# 9000: clients (WebSocket); 9001: the ops server (/health, /metrics, the admin API).
EXPOSE 9000 9001
# SIGTERM drains (new upgrades refused, clients moved or closed within [proxy] drain_timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "atlas"]
CMD ["serve", "--config", "/etc/atlas/atlas.toml"]
