# One image for every platform service (docker-compose.yml picks the `tcp ...` command).
# Multi-stage: dependencies are built into a virtualenv, then copied into a slim runtime image
# that runs as an unprivileged user.
FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tcp ./tcp
COPY connectors ./connectors
COPY dataflows ./dataflows
COPY strategies ./strategies
COPY bots ./bots
COPY sinks ./sinks
COPY backtest ./backtest
COPY bokeh_app ./bokeh_app
RUN pip install .

FROM python:3.12-slim
RUN useradd --create-home --uid 10001 tcp && mkdir -p /data && chown tcp /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 TCP_HOME=/data/home TCP_RECOVERY_DIR=/data/recovery
USER tcp
WORKDIR /data
ENTRYPOINT ["tcp"]
CMD ["--help"]
