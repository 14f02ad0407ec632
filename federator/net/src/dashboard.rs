//! The dashboard on an admin server: `/ui/` is one page embedded in the binary, with its shared
//! script `/ui/live.js` (nothing is loaded from elsewhere), `/ui/events` a server-sent-event stream of the process's status JSON, the same
//! document `/status` serves. For each open page the server computes the status once a second
//! and sends it when it changed (ages change, so in practice about every second), or the
//! reason it cannot be computed; nothing on the page polls. Anything else under `/ui/` is a
//! plain 404 page naming what was asked for.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::admin::StatusFn;

/// How often an open page's status is computed.
pub const PUSH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct Ui {
    page: &'static str,
    status: StatusFn,
}

/// The routes, to merge into an admin server.
pub fn routes(page: &'static str, status: StatusFn) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(index))
        .route("/ui/events", get(events))
        .route("/ui/live.js", get(live_js))
        .route("/ui/{*rest}", get(not_found))
        .with_state(Ui { page, status })
}

async fn index(State(ui): State<Ui>) -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            // The page loads nothing from elsewhere and runs only its own inline script.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        Html(ui.page),
    )
        .into_response()
}

/// The pages' shared script: the event stream and the "live" line.
const LIVE_JS: &str = include_str!("dashboard_live.js");

async fn live_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        LIVE_JS,
    )
        .into_response()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn not_found(Path(rest): Path<String>) -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(format!(
            "<!doctype html><meta charset=\"utf-8\"><title>not found</title>\
             <p>There is no page <code>/ui/{}</code> here. The dashboard is at <a href=\"/ui/\">/ui/</a>.</p>",
            escape(&rest)
        )),
    )
        .into_response()
}

async fn events(
    State(ui): State<Ui>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let stream = futures::stream::unfold(
        (
            ui.status,
            None::<String>,
            tokio::time::interval(PUSH_INTERVAL),
        ),
        |(status, last, mut tick)| async move {
            loop {
                tick.tick().await;
                let now = match status() {
                    Ok(v) => Ok(v.to_string()),
                    Err(e) => Err(e),
                };
                let (event, key) = match now {
                    Ok(json) => (Event::default().event("status").data(json.clone()), json),
                    Err(e) => (Event::default().event("failed").data(e.clone()), e),
                };
                if last.as_deref() != Some(key.as_str()) {
                    return Some((Ok(event), (status, Some(key), tick)));
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The first `status` event of a dashboard's stream at `addr` (for `meshfed demo --check` and
/// `meshfed dashboard`): what a page would show first.
pub async fn first_status(addr: &str) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context as _;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.write_all(
        format!("GET /ui/events HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut lines = BufReader::new(s).lines();
    let mut event = String::new();
    let read = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data:") {
                match event.as_str() {
                    "status" => return Ok(serde_json::from_str(d.trim())?),
                    "failed" => anyhow::bail!("the server cannot report its status: {}", d.trim()),
                    _ => {}
                }
            }
        }
        anyhow::bail!("the event stream ended before a status")
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .context("no status event within 10 s")?
}
