# The relay image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY outbox ./outbox
COPY relay ./relay
RUN pip install --no-cache-dir '.[relay]'
USER nobody
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
