# One image for every Streamfold role: the stream worker, the call runner and the mock upstream.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY streamfold ./streamfold
COPY worker ./worker
COPY producer ./producer
RUN pip install --no-cache-dir .

# Recorded streams, served by the mock upstream.
COPY fixtures ./fixtures

RUN useradd --system --uid 10001 streamfold
USER streamfold

CMD ["python", "-m", "worker", "run"]
