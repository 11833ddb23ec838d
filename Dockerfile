# pgrelay's image: a release build on Debian 12, run as an unprivileged user.
#
# The relay needs DATABASE_URL here: the image has no PostgreSQL server for the development mode's
# embedded database (without DATABASE_URL the relay exits 2 and says so).

FROM rust:1-bookworm AS build
WORKDIR /src
# The dependencies first, in a layer of their own: rebuilt only when Cargo.toml or Cargo.lock
# change, not for every edit of the relay's code. Empty targets stand in for the real ones.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src bench \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > bench/loadgen.rs \
    && cargo build --release --locked --bin pgrelay \
    && rm -rf src bench
COPY src src
COPY sql sql
COPY migrations migrations
COPY bench bench
# The stand-ins' build is older than the sources just copied, but make sure cargo sees that.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin pgrelay

FROM debian:bookworm-slim
# CA certificates: for sslrootcert=system and an https PGRELAY_JWT_JWKS_URL.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgrelay
COPY --from=build /src/target/release/pgrelay /usr/local/bin/pgrelay
USER 10001
# Reachable from outside the container (the relay's own default is 127.0.0.1:8080).
ENV PGRELAY_BIND=0.0.0.0:8080
EXPOSE 8080
# The image has no curl: the binary checks its own /healthz.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 CMD ["pgrelay", "health"]
# SIGTERM drains (see PGRELAY_DRAIN_GRACE); give `docker stop -t` more than the grace period.
STOPSIGNAL SIGTERM
CMD ["pgrelay", "serve"]
