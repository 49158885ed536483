# dicom-node: the DICOM node in a slim, non-root container.
# Build:  docker build -t dicom-node .
# Run:    docker run -p 11112:11112 -v $PWD/models:/models:ro -v dicom-node-data:/var/lib/dicom-node dicom-node
# With Triton on a GPU and an Orthanc demo PACS: docker compose up (see docker-compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/dicom-node
COPY pyproject.toml README.md ./
COPY dicom_node ./dicom_node
COPY inference ./inference
# The project itself with its PostgreSQL journal driver (DL3013 takes the quoted extra for a registry package).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[postgresql]' \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin dicomnode \
 && mkdir -p /etc/dicom-node /models /var/lib/dicom-node \
 && chown dicomnode:dicomnode /var/lib/dicom-node

# The shipped config with the container's volumes as its paths, checked at build time.
COPY config.yaml ./
RUN sed -e 's|^  storage_dir: var |  storage_dir: /var/lib/dicom-node |' -e 's|^  model_repository: models |  model_repository: /models |' config.yaml > /etc/dicom-node/config.yaml \
 && dicom-node check-config /etc/dicom-node/config.yaml

USER 10001:10001
VOLUME ["/etc/dicom-node", "/models", "/var/lib/dicom-node"]
# 11112: DICOM (C-STORE/C-ECHO); 8080: HTTP status API (/healthz, /readyz, /metrics).
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["dicom-node"]
CMD ["serve", "--config", "/etc/dicom-node/config.yaml"]
