# syntax=docker/dockerfile:1.7
# Lethe: one image for every process kind (`lethe serve`, `lethe worker`, `lethe migrate`).
#
#   docker build -t lethe .                                    # CUDA-enabled torch (GPU worker)
#   docker build -t lethe:cpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .   # CPU-only, ~1 GB smaller
#   docker build -t lethe:s3-lm --build-arg LETHE_EXTRAS=s3,lm .  # optional extras (pyproject)
#
# Every package but torch (and torchvision) is installed at the exact version in
# requirements.lock (`make lock`), as pip constraints: the image runs what the tests ran.
#
# PyPI's Linux x86_64 torch wheels bundle the CUDA runtime (as nvidia-* wheels), so the
# default image runs on a GPU host with only the NVIDIA driver and container toolkit
# installed; no CUDA base image is needed.

ARG PYTHON_VERSION=3.12

# ---- build: a virtual environment with torch and Lethe installed ----------------------
FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCHVISION_SPEC=torchvision==0.28.0
ARG TORCH_INDEX=https://pypi.org/simple
# Comma-separated extras of pyproject.toml for this deployment, e.g. "s3,lm" (empty: none).
ARG LETHE_EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
# An extra pyproject does not define would be skipped by pip with a mere warning.
RUN python -c "import sys, tomllib; known = set(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']); asked = {e.strip() for e in sys.argv[1].split(',') if e.strip()}; sys.exit(f'unknown LETHE_EXTRAS: {sorted(asked - known)}; known: {sorted(known)}' if asked - known else 0)" "${LETHE_EXTRAS}"
# torch first, from the chosen index, so the CPU variant never pulls CUDA wheels; torchvision
# (the vision extra) must come from the same index as torch.
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
    $(case ",${LETHE_EXTRAS}," in (*,vision,*) echo "${TORCHVISION_SPEC}";; esac)
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
RUN pip install -c requirements.lock ".${LETHE_EXTRAS:+[${LETHE_EXTRAS}]}" \
    && python -c "import service, worker.imu, torch; print('torch', torch.__version__)"

# ---- runtime: the venv only, run as an unprivileged user -------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
ARG LETHE_UID=10001
LABEL org.opencontainers.image.title="lethe" \
      org.opencontainers.image.description="Make trained PyTorch models forget data on request (IMU)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LETHE_HOME=/var/lib/lethe
RUN groupadd --system --gid ${LETHE_UID} lethe \
    && useradd --system --uid ${LETHE_UID} --gid lethe --home-dir /var/lib/lethe \
       --shell /usr/sbin/nologin lethe \
    && mkdir -p /var/lib/lethe/storage \
    && chown -R lethe:lethe /var/lib/lethe
COPY --from=build /opt/venv /opt/venv
# Migrations ship as the installed `migrations` package: `lethe migrate` needs no source tree.
WORKDIR /var/lib/lethe
# A named volume mounted here starts with this ownership, so the unprivileged user can write.
VOLUME ["/var/lib/lethe"]
USER ${LETHE_UID}:${LETHE_UID}
EXPOSE 8000
# Liveness of the API process. Worker containers override this (see docker-compose.yml).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["lethe"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
