# ROM Agent container: `docker build -t rom-agent .` then
#   docker run -p 8000:8000 -v rom-agent-data:/app/data -e ADMIN_TOKEN rom-agent
# (`-e ADMIN_TOKEN` passes the value from your shell; never write it into a file or image.)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies and package in one layer, pinned by constraints.txt like every other install.
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN pip install -c constraints.txt . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin rom \
    && mkdir -p /app/data /app/kb \
    && chown rom:rom /app/data

USER rom

# Listen on every interface inside the container; SQLite goes to the volume.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    DATABASE_URL=sqlite:////app/data/rom-agent.db \
    KB_DIR=/app/kb

EXPOSE 8000
VOLUME ["/app/data"]

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

# Exec form: the service is PID 1 and receives SIGTERM itself, so it drains before exiting.
CMD ["rom-agent", "serve"]
