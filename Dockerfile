# syntax=docker/dockerfile:1
#
# mongo-watcher image: a release build of the `mongo-watcher` binary on distroless (glibc,
# libgcc, CA certificates, no shell; runs as uid 65532, its `nonroot`).
#
#   docker build -t mongo-watcher .
#   docker run --rm -p 8080:8080 -v "$PWD/my.yaml:/etc/mongo-watcher/config.yaml:ro" \
#     -e MONGO_WATCHER_CONFIG=/etc/mongo-watcher/config.yaml -e AWS_REGION=eu-west-1 mongo-watcher
#
# MONGO_WATCHER_CONFIG is deliberately not set here: without a config file the binary runs in
# drop-in mode (the old tool's environment, see README). Helm and Terraform set it.
#
# HEALTHCHECK: distroless has no shell or curl, so the binary probes itself
# (`mongo-watcher healthcheck`: GET http://127.0.0.1:8080/healthz, exit 0 on 200). With another
# http.listen port, override it (`docker run --health-cmd`, or `healthcheck --url ...`).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /build

# The recipe: the workspace's manifests, lock file and target layout (stub sources for every
# bin, lib, bench and test cargo must see), without our code.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# 1. Dependencies only: this layer stays cached until a manifest or Cargo.lock changes.
COPY --from=planner /build/recipe.json recipe.json
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    cargo chef cook --release --locked -p mongo-watcher --recipe-path recipe.json
# 2. Our code.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    cargo build --release --locked -p mongo-watcher \
    && install -m 0755 target/release/mongo-watcher /usr/local/bin/mongo-watcher

# Same Debian release (12, glibc 2.36) as the builder.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="mongo-watcher" \
      org.opencontainers.image.description="MongoDB change streams into AWS Kinesis, checkpointed in DynamoDB" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /usr/local/bin/mongo-watcher /usr/local/bin/mongo-watcher
USER 65532:65532
# Control plane: /healthz, /readyz, /metrics, /watchers (http.listen, default 0.0.0.0:8080).
EXPOSE 8080
# Liveness only (/healthz does not touch MongoDB or AWS); the start period covers reading SSM
# secrets before the control plane listens.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/mongo-watcher", "healthcheck"]
# The binary handles SIGTERM itself: it drains within 20 s and exits 0 (give it 30 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/mongo-watcher"]
CMD ["run"]
