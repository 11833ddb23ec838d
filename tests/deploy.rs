//! What can be checked of the container setup without a Docker engine: the compose file parses
//! and its services, images and ports are the ones the README names; the Dockerfile has the
//! properties the README promises; and the two commands the image relies on (`pgrelay health`,
//! and `serve`'s refusal to start without a database) behave.

mod common;

use std::collections::BTreeMap;

use serde_yaml::Value;

const COMPOSE: &str = include_str!("../docker-compose.yml");
const DOCKERFILE: &str = include_str!("../Dockerfile");
const README: &str = include_str!("../README.md");
const HAPROXY: &str = include_str!("../deploy/haproxy.cfg");

/// (image, published ports) by service.
type Services = BTreeMap<String, (String, Vec<String>)>;

fn compose_services() -> (Services, Value) {
    let doc: Value = serde_yaml::from_str(COMPOSE).expect("docker-compose.yml parses");
    let services = doc["services"].as_mapping().expect("services");
    let mut found = Services::new();
    for (name, service) in services {
        let name = name.as_str().expect("name").to_owned();
        let image = service["image"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} names its image"))
            .to_owned();
        let ports = service["ports"]
            .as_sequence()
            .map(|p| {
                p.iter()
                    .map(|p| p.as_str().expect("port").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        found.insert(name, (image, ports));
    }
    (found, doc)
}

/// The README's table of compose services: `| `name` | `image` | `ports` or - |`.
fn readme_services() -> Services {
    let section = README
        .split("\n## ")
        .find(|s| s.starts_with("Running in production"))
        .expect("README has a 'Running in production' section");
    let mut found = Services::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let strip = |c: &str| c.trim_matches('`').to_owned();
        let ports = if cells[2] == "-" {
            Vec::new()
        } else {
            cells[2].split(", ").map(strip).collect()
        };
        found.insert(strip(cells[0]), (strip(cells[1]), ports));
    }
    found
}

#[test]
fn the_compose_file_runs_the_services_images_and_ports_the_readme_names() {
    let (services, doc) = compose_services();
    assert_eq!(services, readme_services());
    for relay in ["relay1", "relay2"] {
        let env = &doc["services"][relay]["environment"];
        assert!(
            env["DATABASE_URL"].as_str().is_some(),
            "{relay} needs DATABASE_URL"
        );
        assert!(
            doc["services"][relay]["ports"].is_null(),
            "{relay} is reached through the load balancer only"
        );
    }
    let lb = &doc["services"]["lb"];
    assert_eq!(
        lb["environment"]["RELAY1_ADDR"].as_str(),
        Some("relay1:8080")
    );
    assert_eq!(
        lb["environment"]["RELAY2_ADDR"].as_str(),
        Some("relay2:8080")
    );
    let mounted = lb["volumes"][0].as_str().expect("haproxy.cfg mounted");
    assert!(mounted.starts_with("./deploy/haproxy.cfg:"), "{mounted}");
    for needed in [
        "${RELAY1_ADDR}",
        "${RELAY2_ADDR}",
        "GET /readyz",
        "timeout tunnel",
    ] {
        assert!(HAPROXY.contains(needed), "haproxy.cfg: {needed}");
    }
}

#[test]
fn the_dockerfile_builds_locked_with_a_dependency_layer_and_runs_unprivileged() {
    let build_stages = DOCKERFILE
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert_eq!(build_stages, 2, "multi-stage");
    let locked = DOCKERFILE.matches("cargo build --release --locked").count();
    assert_eq!(locked, 2, "dependencies, then the relay, both --locked");
    let manifest = DOCKERFILE
        .find("COPY Cargo.toml Cargo.lock")
        .expect("manifest first");
    let sources = DOCKERFILE.find("COPY src src").expect("sources");
    assert!(
        manifest < sources,
        "the dependency layer comes before the sources"
    );
    assert!(DOCKERFILE.contains("USER 10001"));
    assert!(DOCKERFILE.contains("ENV PGRELAY_BIND=0.0.0.0:8080"));
    assert!(
        DOCKERFILE.contains(r#"HEALTHCHECK"#) && DOCKERFILE.contains(r#"["pgrelay", "health"]"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_0_for_a_live_relay_and_1_otherwise() {
    let db = common::fresh_database().await;
    let (_relay, addr) = common::spawn_relay(&db, &[]).await;
    let health = |bind: String, ready: bool| async move {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
        command.arg("health").env("PGRELAY_BIND", bind);
        if ready {
            command.arg("--ready");
        }
        command.output().await.expect("run pgrelay health")
    };
    assert!(health(addr.clone(), false).await.status.success());
    assert!(health(addr.clone(), true).await.status.success());
    // 0.0.0.0 (the image's bind address) is checked on the loopback interface.
    let port = addr.rsplit(':').next().expect("port");
    assert!(health(format!("0.0.0.0:{port}"), false)
        .await
        .status
        .success());
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let closed = nobody.local_addr().expect("addr").to_string();
    drop(nobody);
    let out = health(closed.clone(), false).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&closed));
}

#[tokio::test]
async fn serve_without_a_database_or_postgres_binaries_exits_2_saying_so() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .env("PGRELAY_PG_BIN_DIR", "/nonexistent")
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("set DATABASE_URL"), "{stderr}");
}
