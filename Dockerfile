# One image for every kvlab service: router, emulated workers, Locust.
FROM python:3.11-slim
WORKDIR /opt/kvlab
COPY pyproject.toml README.md ./
COPY kvlab ./kvlab
COPY emulator ./emulator
COPY workers ./workers
COPY router ./router
COPY loadtests ./loadtests
RUN pip install --no-cache-dir .
ENV PYTHONUNBUFFERED=1
CMD ["kvlab", "--help"]
