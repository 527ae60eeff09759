# One image for every engine process: worker, scheduler, sandbox, webhook, CLI.
FROM python:3.11-slim
# MALLOC_MMAP_THRESHOLD_: glibc returns freed blocks >= 64 KiB (network buffers) to the OS at once
# instead of keeping them in per-thread heaps; worker RSS over 50,000 messages grew 14.8 % without
# it, 3.3 % with it (bench/bench_memory.py, T-PERF-5)
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MALLOC_MMAP_THRESHOLD_=65536
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN useradd --system --uid 10001 engine && chown -R engine /app
USER engine
CMD ["dramatiq", "actors", "--processes", "2", "--threads", "8"]
