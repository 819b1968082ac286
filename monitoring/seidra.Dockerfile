# Runtime image for a SEIDRA binary built on the host with cargo (see README.md):
#   cargo build --release --locked
#   mkdir -p monitoring/.image && cp target/release/seidra monitoring/.image/
#   docker build -t seidra:latest -f monitoring/seidra.Dockerfile monitoring/.image
# The binary links glibc dynamically: build it on Debian 12 (bookworm) or older.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY seidra /usr/local/bin/seidra
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/seidra"]
