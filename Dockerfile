# dbproxy: one image for the sidecar (`dbproxy serve`), the collector and the injector.
#   docker build -t ghcr.io/dbproxy/dbproxy:0.1.0 .
# Stage 1 builds the package and its dependencies into a virtual environment.
FROM python:3.12-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/dbproxy
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN /opt/dbproxy/bin/pip install . && /opt/dbproxy/bin/python -m compileall -q /opt/dbproxy

# Stage 2: the runtime, the environment only, run as an unprivileged user.
FROM python:3.12-slim-bookworm
LABEL org.opencontainers.image.title="dbproxy" \
      org.opencontainers.image.description="Database access sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 dbproxy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/dbproxy --create-home \
      --shell /usr/sbin/nologin dbproxy
COPY --from=build /opt/dbproxy /opt/dbproxy
ENV PATH=/opt/dbproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /home/dbproxy
USER 10001:10001
EXPOSE 8700 8710 8443
ENTRYPOINT ["dbproxy"]
CMD ["--help"]
