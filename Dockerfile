# One image for every InstructLoop process; docker-compose.yml picks the command.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv/instructloop
# torch: pass --build-arg TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124" for GPUs.
# It goes first so that the build chosen here satisfies the lock's torch==2.13.0.
ARG TORCH="torch==2.13.0"
RUN pip install $TORCH
# Exact versions of the web, the CLI and the worker's training stack (`make lock` writes them).
COPY requirements-train.lock ./
RUN pip install -r requirements-train.lock
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY templates ./templates
COPY migrations ./migrations
COPY models ./models
RUN pip install --no-deps -e .
RUN useradd --create-home instructloop && mkdir -p /data && chown instructloop /data
USER instructloop
ENV INSTRUCTLOOP_DATA_DIR=/data
EXPOSE 8000
CMD ["instructloop", "serve", "--host", "0.0.0.0", "--port", "8000"]
