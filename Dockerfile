# syntax=docker/dockerfile:1
# The operator image: `dbpolicy run` (the controller), and the same binary as the backup
# job's command, which needs pg_dump/pg_restore. Build: docker build -t dbpolicy/dbpolicy .
# (see docs/image.md; there is no container engine on the development machines).

# ---- build: a release binary, dependencies cached between builds by BuildKit
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Only its manifest: cargo reads it (a workspace member), the release build compiles none of it.
COPY tests/support/Cargo.toml ./tests/support/
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin dbpolicy \
 && install -D -m 0755 target/release/dbpolicy /out/dbpolicy \
 && strip /out/dbpolicy

# ---- run: Debian slim with the PostgreSQL client tools (pg_dump must be at least the
# server's major version; trixie ships 17). The builder's glibc (bookworm) is older than
# the runtime's, so the binary runs here.
FROM debian:trixie-slim
ARG PG_MAJOR=17
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates "postgresql-client-${PG_MAJOR}" \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man
COPY --from=build /out/dbpolicy /usr/local/bin/dbpolicy
# The chart's restricted pod security runs this as 65532 with a read-only root filesystem
# and an emptyDir on /tmp: nothing else is written.
ENV HOME=/tmp
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/dbpolicy"]
CMD ["run"]
