# syntax=docker/dockerfile:1
# The `ese` binary in a small Debian image. Build: `docker build -t ese .`
# (docker compose builds it for every engine service).

# --- build ---------------------------------------------------------------
FROM rust:1.95-bookworm AS builder

# rdkafka (default features: librdkafka built from source with zlib only, so
# no libssl/libsasl2/libcurl) needs a C toolchain, make, perl and zlib headers;
# the embedded broker's libsql needs cmake and libclang (bindgen), aws-lc
# needs cmake.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake perl pkg-config zlib1g-dev clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Everything the build reads: Cargo.*, src/, benches/, and the files embedded
# with include_str!/embed_migrations! (config/, pipelines/, schemas/, migrations/).
COPY . .

# Cache mounts keep the registry and target/ between builds; the binary is
# copied out of the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && cp target/release/ese /usr/local/bin/ese

# --- runtime -------------------------------------------------------------
FROM debian:bookworm-slim

# The binary links libz, libgcc_s and libc dynamically (all in the base image;
# zlib1g listed to be explicit); ca-certificates for HTTPS to the provider.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /home/ese ese

COPY --from=builder /usr/local/bin/ese /usr/local/bin/ese

USER ese
WORKDIR /home/ese
# Defaults are embedded in the binary; configure with ESE__SECTION__KEY,
# DATABASE_URL, KAFKA_BROKERS and the secrets (see README.md).
ENTRYPOINT ["ese"]
CMD ["--help"]
