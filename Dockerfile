# Multi-stage: build with the Rust toolchain, run on a small Debian image as
# a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin locus --bin locus-load \
 && cp target/release/locus target/release/locus-load /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 locus
COPY --from=build /usr/local/bin/locus /usr/local/bin/locus-load /usr/local/bin/
USER locus
EXPOSE 50051 8080 9000
HEALTHCHECK --interval=5s --timeout=5s --start-period=10s --retries=12 CMD ["locus", "health"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["locus", "serve"]
