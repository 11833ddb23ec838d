//! The live board of development mode: `pgrelay serve` without `DATABASE_URL` serves it at `/`.
//!
//! It stands in for an application: a page (built into the binary) that uses the JavaScript
//! client, and two endpoints an app's API would have. `/demo/users` hands out dev tokens for the
//! demo users; `/demo/board` returns the tasks and comments a user may read in a project together
//! with `pgrelay.position()`, from one snapshot, so the board joins with `since` = that position
//! and misses nothing between loading and subscribing. Nothing here writes: changes come from SQL
//! (`pgrelay demo simulate`, psql). None of it exists when the relay runs on a real database.
//!
//! The endpoints answer any origin (`Access-Control-Allow-Origin: *`) so that the board also
//! works from another origin, as a real app's page would; they are development-only.

pub mod simulate;

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::protocol::ErrorCode;
use crate::server::AppState;
use crate::transport::refuse;

/// What the demo needs to mint tokens the relay accepts (the development secret).
#[derive(Clone)]
pub struct Demo {
    pub secret: Vec<u8>,
}

/// The demo users, as `migrations/demo/seed.sql` creates them.
pub const USERS: [(&str, &str, &str); 4] = [
    ("u1", "alice", "owner of project 1"),
    ("u2", "bob", "member of project 1"),
    ("u3", "carol", "viewer of project 1, owner of project 2"),
    ("u4", "dave", "in no project"),
];

/// The board's files. `pgrelay-client.js` is the client library's build (`clients/js`,
/// `npm run build` copies it here; the client's tests fail if it is out of date), committed so
/// that building the relay needs no Node.
const ASSETS: [(&str, &str, &str); 4] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("assets/index.html"),
    ),
    (
        "/board.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/board.js"),
    ),
    (
        "/board.css",
        "text/css; charset=utf-8",
        include_str!("assets/board.css"),
    ),
    (
        "/pgrelay-client.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/pgrelay-client.js"),
    ),
];

/// The board's routes, merged into the relay's in development mode only.
pub fn routes(demo: Demo) -> Router<AppState> {
    let mut router = Router::new();
    for (path, content_type, body) in ASSETS {
        router = router.route(
            path,
            get(move || async move { ([(header::CONTENT_TYPE, content_type)], body) }),
        );
    }
    router
        .route(
            "/demo/users",
            get(move |query: Query<UsersQuery>| async move { users(&demo, query.0) }),
        )
        .route("/demo/board", get(board))
}

#[derive(Deserialize)]
struct UsersQuery {
    /// Token lifetime in seconds (short ones let a test watch the client refresh).
    ttl: Option<u64>,
}

fn users(demo: &Demo, query: UsersQuery) -> Response {
    let ttl = Duration::from_secs(query.ttl.unwrap_or(86_400).clamp(10, 86_400));
    let mut list = Vec::new();
    for (id, name, note) in USERS {
        match crate::jwt::mint(&demo.secret, id, ttl, &Map::new()) {
            Ok(token) => list.push(json!({"id": id, "name": name, "note": note, "token": token})),
            Err(err) => {
                return refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    &format!("{err:#}"),
                )
            }
        }
    }
    cors(Json(json!({ "users": list })).into_response())
}

#[derive(Deserialize)]
struct BoardQuery {
    token: String,
    project: Option<i64>,
}

/// The board's data for one user and project, and the position it was read at.
async fn board(State(app): State<AppState>, Query(query): Query<BoardQuery>) -> Response {
    let principal = match app.verifier.verify(&query.token) {
        Ok(principal) => principal,
        Err(err) => {
            return cors(refuse(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                &err.to_string(),
            ))
        }
    };
    match read_board(&app, &principal, query.project).await {
        Ok(body) => cors(Json(body).into_response()),
        Err(err) => cors(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal,
            &format!("{err:#}"),
        )),
    }
}

/// One REPEATABLE READ transaction: the data and `pgrelay.position()` see the same snapshot.
async fn read_board(
    app: &AppState,
    principal: &crate::jwt::Principal,
    project: Option<i64>,
) -> anyhow::Result<Value> {
    let mut client = app.subscriptions.pool.get().await?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let user = principal.user.as_str();
    let claims = &principal.claims;
    let mut projects = Vec::new();
    for row in tx
        .query(
            "SELECT p.id, p.name, m.role FROM projects p
               JOIN project_members m ON m.project_id = p.id AND m.user_id = $1
              ORDER BY p.id",
            &[&user],
        )
        .await?
    {
        let (id, name, role): (i64, String, String) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        projects.push(json!({"id": id, "name": name, "role": role}));
    }
    let project = project.or_else(|| projects.first().and_then(|p| p["id"].as_i64()));
    let member = project.is_some_and(|id| projects.iter().any(|p| p["id"] == id));
    let mut tasks = Vec::new();
    let mut comments = Vec::new();
    if member {
        let readable = [
            (
                "SELECT to_jsonb(t) FROM tasks t
               WHERE t.project_id = $1 AND can_read_task($2, $3, to_jsonb(t)) ORDER BY t.id",
                &mut tasks,
            ),
            (
                "SELECT to_jsonb(c) FROM comments c
               WHERE c.project_id = $1 AND can_read_comment($2, $3, to_jsonb(c)) ORDER BY c.id",
                &mut comments,
            ),
        ];
        for (sql, into) in readable {
            for row in tx.query(sql, &[&project, &user, claims]).await? {
                into.push(row.try_get::<_, Value>(0)?);
            }
        }
    }
    let mut names = Map::new();
    for row in tx
        .query("SELECT id, name FROM users ORDER BY id", &[])
        .await?
    {
        names.insert(row.try_get(0)?, Value::String(row.try_get(1)?));
    }
    let position: String = tx
        .query_one("SELECT pgrelay.position()", &[])
        .await?
        .try_get(0)?;
    tx.commit().await?;
    Ok(json!({
        "user": user,
        "project": if member { project } else { None },
        "projects": projects,
        "tasks": tasks,
        "comments": comments,
        "names": names,
        "position": position,
    }))
}

fn cors(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}
