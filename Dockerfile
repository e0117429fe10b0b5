# syntax=docker/dockerfile:1
# arrowvision as a baked image: the build stage (full install, torch) exports and validates the model
# once into a bundle; the runtime stage holds the runtime install (no torch, nncf or transformers)
# and that bundle only, and serves it. See docker/README.md (GPU and Ray variants).
#
#   docker build -t arrowvision --build-arg WEIGHTS=weights/siglip-demo-random.parquet .
#   docker run --rm -p 8000:8000 -e ARROWVISION_API_KEY=change-me arrowvision

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# torch first and pinned to the CPU wheel: an open range pulls the multi-GB CUDA wheels
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY arrowvision ./arrowvision
# The checkout itself: its dependency ranges live in pyproject.toml (torch is pinned above).
# hadolint ignore=DL3013
RUN pip install ".[quantize]" \
    && pip wheel --no-deps --wheel-dir /wheels .
ARG WEIGHTS=weights/siglip-demo-random.parquet
ARG BACKEND=openvino
ARG PRECISION=fp32
ARG TOWER=vision
COPY ${WEIGHTS} /src/model.parquet
# Bundled at the path it is served from: OpenVINO's compiled-model cache is keyed by that path.
RUN if [ "${BACKEND}" = auto ]; then set --; else set -- --precision "${PRECISION}"; fi \
    && arrowvision bundle --weights /src/model.parquet -o /bundle --backend "${BACKEND}" --tower "${TOWER}" "$@" --no-progress

FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    ARROWVISION_CACHE=/home/arrowvision/.cache/arrowvision
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin arrowvision
COPY --from=build /wheels /wheels
RUN find /wheels -name 'arrowvision-*.whl' -exec pip install '{}[runtime]' \; \
    && rm -rf /wheels
# Owned by the service user so that OpenVINO may refresh cache/ on another CPU; every other file is
# checked against the manifest's BLAKE3 checksums at start, so an edit is refused, not served.
COPY --from=build --chown=arrowvision:arrowvision /bundle /bundle
USER 10001:10001
WORKDIR /home/arrowvision
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
# Listening on 0.0.0.0 needs an API key (ARROWVISION_API_KEY) or an explicit --allow-unauthenticated
# passed as arguments: `docker run IMAGE --allow-unauthenticated`.
ENTRYPOINT ["arrowvision", "serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8000"]
CMD []
