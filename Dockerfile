# streamhps: one image for the processor, the trainer and the inference server.
#   docker build -t streamhps .                                  (CPU: numpy cache, torch CPU)
#   docker build -t streamhps:gpu --build-arg EXTRAS=train,gpu . (adds CuPy for --device cuda)
FROM python:3.11-slim

ARG EXTRAS=train
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# torch first, from the CPU index: the default wheel drags in ~3 GB of CUDA libraries that the
# trainer (CPU) does not use; the server's CUDA cache uses CuPy, not torch.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.2"

COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY streamhps ./streamhps
COPY servers ./servers
COPY trainers ./trainers
COPY demo ./demo
RUN pip install ".[${EXTRAS}]"
# The numpy cache's compiled loops (streamhps/cache/host_kernels.py), for every row width, into
# a numba cache directory the unprivileged user reads: containers load them, not compile them.
ENV NUMBA_CACHE_DIR=/var/cache/streamhps-numba
RUN python -c "from streamhps.cache.numpy_backend import NumpyCache as C; \
    [C(64, d, t) for d, t in ((2, 'float32'), (1, 'float32'), (1, 'float16'))]"

# Unprivileged user; /data holds the LMDB store (a named volume in compose.yaml).
RUN useradd --create-home --uid 10001 streamhps && mkdir -p /data && chown streamhps /data \
    && chown -R streamhps "$NUMBA_CACHE_DIR"
USER streamhps
VOLUME ["/data"]
EXPOSE 8000

ENTRYPOINT ["streamhps"]
CMD ["--help"]
