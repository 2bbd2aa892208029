# modelserve API image. CPU by default; for a GPU build pass a CUDA wheel index, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 -t modelserve:gpu .
# (docker-compose.yml's `gpu` profile does this and runs it with the NVIDIA runtime).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
# Dependencies first (cached layer): torch from the chosen index, the rest from PyPI.
COPY requirements.txt ./
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4" \
    && pip install -r requirements.txt

COPY pyproject.toml README.md ./
COPY models ./models
COPY adapters ./adapters
COPY training ./training
COPY service ./service
COPY bench ./bench
COPY loadtest ./loadtest
RUN pip install --no-deps --no-build-isolation -e . \
    && useradd --create-home --uid 10001 modelserve \
    && mkdir -p /app/artifacts && chown modelserve /app/artifacts
USER modelserve

# Models are read from /app/artifacts (mount the demo zoo built by `make build`, or your own directories
# with --model NAME=DIR). With no zoo mounted, the container builds the demo preset once at start.
ENV MODELSERVE_HOST=0.0.0.0 MODELSERVE_PORT=8000 PRESET=demo
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"
CMD ["sh", "-c", "test -f artifacts/student/config.json || python -m service build --preset \"$PRESET\"; exec python -m service serve"]
