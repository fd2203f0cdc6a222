# syntax=docker/dockerfile:1
# The opsconductor-operator image: one static executable and the CA certificates, nothing else.
#
#   docker build -t opsconductor-operator:0.1.0 .
#
# The build stage runs scripts/build-static, the same command that builds and checks the
# binary without Docker (release profile, x86_64-unknown-linux-gnu with crt-static: see the
# script for why not musl). The runtime is `scratch`: no shell, no package manager, no libc
# files; the binary reads /etc/ssl/certs/ca-certificates.crt and, for name lookups, the
# /etc/hosts and /etc/resolv.conf the kubelet mounts.

ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-bookworm AS build
# `file` and `readelf` (binutils) for the static checks; ca-certificates for the runtime stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends file binutils ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them: build once with a stub
# main and the real Cargo.toml/Cargo.lock.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --release --target x86_64-unknown-linux-gnu --bin opsconductor-operator \
 && rm -rf src
COPY src ./src
COPY scripts/build-static ./scripts/build-static
# The stub's artifacts are older than the sources: touch main.rs and lib.rs so cargo rebuilds.
RUN touch src/main.rs src/lib.rs && scripts/build-static \
 && cp target/x86_64-unknown-linux-gnu/release/opsconductor-operator /opsconductor-operator \
 && /opsconductor-operator --version

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /opsconductor-operator /opsconductor-operator
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# The chart's securityContext runs it as 65532:65532 too; the image says so on its own.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/opsconductor-operator"]
CMD ["run"]
LABEL org.opencontainers.image.title="opsconductor-operator" \
      org.opencontainers.image.description="Edge TLS, internal HTTP, enforced: a Kubernetes operator" \
      org.opencontainers.image.licenses="Apache-2.0"
