FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release

FROM debian:bookworm-slim
COPY --from=build /src/target/release/pgrelay /usr/local/bin/pgrelay
EXPOSE 8080
CMD ["pgrelay", "serve"]
