//! `GET /v1/events/stream`: lifecycle events as server-sent events, as they happen.
//!
//! Each event is one SSE message: `id: <event id>`, `event: lifecycle`, `data: <the Event
//! as JSON, one line>`. The stream starts after `?after=ID` (default: the newest event now,
//! so only new ones), optionally for one `?profile=NAME`, and sends a comment every 15 s
//! while nothing happens. The daemon reads the new events every [`POLL`]; a stopping daemon
//! ends the stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};

use crate::api::ApiError;
use crate::daemon::Handset;
use crate::db::{Event, Log};
use crate::error::Error;

/// How often the stream looks for new events.
pub const POLL: Duration = Duration::from_millis(200);
/// The most events one look reads (a burst larger than this is sent over several looks).
const BATCH: u32 = 1000;

/// `?after=&profile=` of `GET /v1/events/stream`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Send the events with a larger id (default: those after the newest one now).
    pub after: Option<i64>,
    /// Only this profile's events.
    pub profile: Option<String>,
}

/// The next events after `after`, oldest first, at most [`BATCH`].
fn newer(h: &Handset, profile: Option<&str>, after: i64) -> Result<Vec<Event>, Error> {
    h.events_after(Log::Events, profile, after, BATCH)
}

/// The handler: checks the query (400, or 404 for a profile that never existed), then streams.
pub async fn stream(
    State(h): State<Arc<Handset>>,
    q: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::from(Error::BadRequest(e.body_text())))?;
    if let Some(after) = q.after.filter(|a| *a < 0) {
        return Err(Error::BadRequest(format!("after {after} is negative")).into());
    }
    // The same checks as the events routes: a bad name is a 400, an unknown one a 404.
    let now = h.events(Log::Events, q.profile.as_deref(), 1)?;
    let after = q.after.unwrap_or_else(|| now.last().map_or(0, |e| e.id));
    let start = (
        h,
        q.profile,
        after,
        std::collections::VecDeque::<Event>::new(),
    );
    let events = stream::unfold(start, |(h, profile, mut after, mut pending)| async move {
        loop {
            if let Some(e) = pending.pop_front() {
                after = e.id;
                let msg = sse_message(&e);
                return Some((Ok(msg), (h, profile, after, pending)));
            }
            if h.closing() {
                return None;
            }
            tokio::time::sleep(POLL).await;
            match newer(&h, profile.as_deref(), after) {
                Ok(list) => pending = list.into(),
                Err(e) => tracing::warn!("event stream: {e}"),
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

fn sse_message(e: &Event) -> SseEvent {
    let data = serde_json::to_string(e).unwrap_or_else(|_| "{}".into());
    SseEvent::default()
        .id(e.id.to_string())
        .event("lifecycle")
        .data(data)
}
