# Small runtime image: a static-ish release build on Debian slim, run as a non-root user.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
RUN cargo build --release --locked --bin pgnear && strip target/release/pgnear

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /nonexistent --shell /usr/sbin/nologin pgnear
COPY --from=build /src/target/release/pgnear /usr/local/bin/pgnear
COPY config/pgnear.toml /etc/pgnear/pgnear.toml
USER pgnear
ENV PGNEAR_LISTEN=0.0.0.0:6432 PGNEAR_ADMIN_LISTEN=0.0.0.0:9930
EXPOSE 6432 9930
ENTRYPOINT ["/usr/local/bin/pgnear"]
CMD ["run", "--config", "/etc/pgnear/pgnear.toml"]
