# syncfs in a container: `docker run --device /dev/fuse --cap-add SYS_ADMIN ...`
# Build stage: the project's own toolchain image, then a slim runtime with fuse3.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY mount-tests mount-tests
RUN cargo build --release --locked --bin syncfs

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 attr ca-certificates git \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/syncfs /usr/local/bin/syncfs
RUN mkdir -p /sync /var/lib/syncfs
VOLUME ["/var/lib/syncfs"]
# Runs in the foreground so the container lives as long as the mount; SIGTERM unmounts.
ENTRYPOINT ["syncfs", "mount", "/sync", "--foreground", "--state", "/var/lib/syncfs", "-o", "allow_other"]
