# One image for every engine process: worker, scheduler, sandbox, webhook, CLI.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN useradd --system --uid 10001 engine && chown -R engine /app
USER engine
CMD ["dramatiq", "actors", "--processes", "2", "--threads", "8"]
