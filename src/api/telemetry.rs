//! `GET /api/system/telemetry/generation`: the newest measurements, a summary of the whole
//! filtered window, and the buffer of recent events.

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi};
use ractor::rpc::CallResult;
use sea_orm::DbErr;

use crate::actors::BroadcastMessage;
use crate::api::auth::BearerAuth;
use crate::api::errors::ErrorBody;
use crate::api::memo::{self, JsonBytes, Question, Window};
use crate::api::{ApiTags, AppState};
use crate::events::{EventEnvelope, GenerationItem};
use crate::generation::{JobStatus, MediaType};
use crate::storage::queries::{self, Cursor, Figures, GroupFigures, Percentiles};
use crate::storage::rollup;
use crate::storage::{TelemetryFilter, TelemetrySummary};

/// How a measured generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum RowStatus {
    /// Produced its outputs.
    Succeeded,
    /// Ended with an error.
    Failed,
    /// Cancelled by a client.
    Cancelled,
}

impl From<RowStatus> for JobStatus {
    fn from(status: RowStatus) -> Self {
        match status {
            RowStatus::Succeeded => JobStatus::Succeeded,
            RowStatus::Failed => JobStatus::Failed,
            RowStatus::Cancelled => JobStatus::Cancelled,
        }
    }
}

/// Aggregates of a set of rows. Means of duration, throughput and VRAM count succeeded
/// generations only and are null when none qualifies; the queue-wait mean counts every row.
/// Percentiles are nearest rank: exact when `percentiles_exact` is true, otherwise estimated
/// from hourly and daily histograms within 1 % of the exact value (relative), and never
/// outside the minimum and maximum.
#[derive(Debug, Clone, Object)]
pub struct SummaryFigures {
    /// Rows.
    pub total: i64,
    /// Succeeded rows.
    pub succeeded: i64,
    /// Failed rows.
    pub failed: i64,
    /// Cancelled rows.
    pub cancelled: i64,
    /// Mean inference time, seconds.
    #[oai(nullable)]
    pub avg_duration_seconds: Option<f64>,
    /// Shortest inference time, seconds.
    #[oai(nullable)]
    pub min_duration_seconds: Option<f64>,
    /// Longest inference time, seconds.
    #[oai(nullable)]
    pub max_duration_seconds: Option<f64>,
    /// Median inference time, seconds.
    #[oai(nullable)]
    pub p50_duration_seconds: Option<f64>,
    /// 95th percentile of inference time, seconds.
    #[oai(nullable)]
    pub p95_duration_seconds: Option<f64>,
    /// 99th percentile of inference time, seconds.
    #[oai(nullable)]
    pub p99_duration_seconds: Option<f64>,
    /// Whether p50, p95 and p99 are exact rather than within 1 %.
    pub percentiles_exact: bool,
    /// Mean outputs per second.
    #[oai(nullable)]
    pub avg_throughput: Option<f64>,
    /// Mean peak VRAM, MiB.
    #[oai(nullable)]
    pub avg_vram_peak_mb: Option<f64>,
    /// Mean VRAM in use at the end, MiB.
    #[oai(nullable)]
    pub avg_vram_allocated_mb: Option<f64>,
    /// Mean VRAM reserved at the end, MiB.
    #[oai(nullable)]
    pub avg_vram_reserved_mb: Option<f64>,
    /// Mean queue wait, seconds.
    #[oai(nullable)]
    pub avg_queue_wait_seconds: Option<f64>,
}

impl SummaryFigures {
    fn new(figures: Figures, percentiles: Percentiles) -> Self {
        SummaryFigures {
            total: figures.total,
            succeeded: figures.succeeded,
            failed: figures.failed,
            cancelled: figures.cancelled,
            avg_duration_seconds: figures.avg_duration_seconds,
            min_duration_seconds: figures.min_duration_seconds,
            max_duration_seconds: figures.max_duration_seconds,
            p50_duration_seconds: percentiles.p50,
            p95_duration_seconds: percentiles.p95,
            p99_duration_seconds: percentiles.p99,
            percentiles_exact: percentiles.exact,
            avg_throughput: figures.avg_throughput,
            avg_vram_peak_mb: figures.avg_vram_peak_mb,
            avg_vram_allocated_mb: figures.avg_vram_allocated_mb,
            avg_vram_reserved_mb: figures.avg_vram_reserved_mb,
            avg_queue_wait_seconds: figures.avg_queue_wait_seconds,
        }
    }
}

/// The figures of one model or device.
#[derive(Debug, Clone, Object)]
pub struct GroupSummary {
    /// The model's or device's name.
    pub key: String,
    /// Its figures.
    #[oai(flatten)]
    pub figures: SummaryFigures,
}

impl From<GroupFigures> for GroupSummary {
    fn from(group: GroupFigures) -> Self {
        GroupSummary {
            key: group.key,
            figures: SummaryFigures::new(group.figures, group.percentiles),
        }
    }
}

/// The summary of the whole filtered window, not just the page.
#[derive(Debug, Clone, Object)]
pub struct Summary {
    /// Figures of every matching row.
    #[oai(flatten)]
    pub figures: SummaryFigures,
    /// The same, by model.
    pub by_model: Vec<GroupSummary>,
    /// The same, by device.
    pub by_device: Vec<GroupSummary>,
}

impl From<TelemetrySummary> for Summary {
    fn from(summary: TelemetrySummary) -> Self {
        Summary {
            figures: SummaryFigures::new(summary.figures, summary.percentiles),
            by_model: summary
                .by_model
                .into_iter()
                .map(GroupSummary::from)
                .collect(),
            by_device: summary
                .by_device
                .into_iter()
                .map(GroupSummary::from)
                .collect(),
        }
    }
}

/// The endpoint's answer.
#[derive(Debug, Clone, Object)]
pub struct TelemetryResponse {
    /// Matching rows, newest first.
    pub items: Vec<GenerationItem>,
    /// Figures of every matching row.
    pub summary: Summary,
    /// The latest `telemetry.generation` events, oldest first, as the WebSocket carried them
    /// (filtered by `media_type` when given).
    pub recent: Vec<EventEnvelope>,
}

#[derive(ApiResponse)]
enum GenerationTelemetryResponse {
    /// Items, summary and recent events.
    #[oai(status = 200)]
    Ok(JsonBytes<TelemetryResponse>),
    /// A parameter is invalid; the message names it and says what is allowed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No valid token.
    #[oai(status = 401)]
    #[allow(dead_code)] // answered by the bearer scheme's checker; listed for the document
    Unauthorized(Json<ErrorBody>),
    /// The token lacks the operator role.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// The database cannot be read right now.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

/// Operator telemetry routes.
pub struct TelemetryApi;

#[OpenApi(prefix_path = "/api/system", tag = "ApiTags::System")]
impl TelemetryApi {
    /// Measured generations: newest rows, summary of the filtered window, recent events.
    #[allow(clippy::too_many_arguments)]
    #[oai(path = "/telemetry/generation", method = "get")]
    async fn generation(
        &self,
        auth: BearerAuth,
        state: Data<&AppState>,
        /// Rows to return, 1 to 1000.
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "1000"))
        )]
        limit: Query<u64>,
        /// Only rows committed in the last `minutes` (1 to 5256000, ten years).
        #[oai(validator(minimum(value = "1"), maximum(value = "5256000")))]
        minutes: Query<Option<u32>>,
        /// Only `image` or `video` rows.
        media_type: Query<Option<MediaType>>,
        /// Only this model.
        #[oai(validator(min_length = 1, max_length = 256, pattern = "^[^\\x00]*$"))]
        model_name: Query<Option<String>>,
        /// Only this user's jobs.
        #[oai(validator(min_length = 1, max_length = 256, pattern = "^[^\\x00]*$"))]
        user_id: Query<Option<String>>,
        /// Only this persona's jobs.
        #[oai(validator(min_length = 1, max_length = 256, pattern = "^[^\\x00]*$"))]
        persona_id: Query<Option<String>>,
        /// Only this device, e.g. `cpu` or `cuda:0`.
        #[oai(validator(min_length = 1, max_length = 64, pattern = "^[^\\x00]*$"))]
        device: Query<Option<String>>,
        /// Only rows with this status.
        status: Query<Option<RowStatus>>,
        /// Items after the last one seen, to page further back: an item id (the last `id` of
        /// the previous page: items older than it, or as old with a smaller id; an id no row
        /// has, one purged for instance, gives no items) or an RFC 3339 time such as
        /// `2026-12-04T16:00:00Z` (items committed strictly before it).
        // Whatever the pattern admits is an id or a real time (leap days included) that
        // `parse_cursor` takes: a value the document allows is never refused.
        #[oai(validator(
            max_length = 64,
            pattern = "^([1-9][0-9]{0,17}|([0-9]{4}-((0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|(0[13-9]|1[0-2])-(29|30)|(0[13578]|1[02])-31)|([0-9]{2}(0[48]|[2468][048]|[13579][26])|([02468][048]|[13579][26])00)-02-29)T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9]))$"
        ))]
        before: Query<Option<String>>,
    ) -> GenerationTelemetryResponse {
        if !auth.0.is_operator() {
            return GenerationTelemetryResponse::Forbidden(ErrorBody::new(
                "forbidden",
                "this route needs a token with the operator role",
            ));
        }
        let before = match before.0.as_deref().map(parse_cursor).transpose() {
            Ok(before) => before,
            Err(message) => {
                return GenerationTelemetryResponse::BadRequest(ErrorBody::new(
                    "bad_request",
                    message,
                ));
            }
        };
        let since = minutes
            .0
            .map(|m| Utc::now() - chrono::Duration::minutes(i64::from(m)));
        let question = Question {
            limit: limit.0,
            minutes: minutes.0,
            filter: TelemetryFilter {
                since: None,
                media_type: media_type.0,
                model_name: model_name.0,
                user_id: user_id.0,
                persona_id: persona_id.0,
                device: device.0,
                status: status.0.map(JobStatus::from),
            },
            before,
        };
        match answer(&state, question, since).await {
            Ok(answer) => GenerationTelemetryResponse::Ok(answer),
            Err(error) => {
                tracing::warn!(error = %error, "telemetry query failed");
                GenerationTelemetryResponse::Unavailable(ErrorBody::new(
                    "unavailable",
                    "the telemetry database cannot be read right now",
                ))
            }
        }
    }
}

/// The answer to `question` for a window starting at `since`: the kept one while it holds,
/// otherwise built (and kept).
async fn answer(
    state: &AppState,
    question: Question,
    since: Option<DateTime<Utc>>,
) -> Result<JsonBytes<TelemetryResponse>, DbErr> {
    let answers = &state.answers;
    if !answers.enabled() {
        return Ok(build(state, &question, since).await?.answer);
    }
    let mut building = None;
    let changes = loop {
        // Read before the answer is built: a change made meanwhile moves it past what is kept.
        let changes = rollup::changes(&state.db).await?.unwrap_or_default();
        let kept = answers.get(
            &question,
            memo::State {
                changes,
                recent_seq: recent_seq(state).await,
            },
            since,
        );
        if let Some(hit) = kept {
            if let Some(next) = hit.build_next {
                tokio::spawn(build_ahead(state.clone(), question, next));
            }
            return Ok(hit.answer);
        }
        if building.is_some() {
            break changes;
        }
        // Another request may have built it while this one waited: look again.
        building = Some(answers.build(&question).await);
    };
    let built = build(state, &question, since).await?;
    let answer = built.answer.clone();
    keep(state, question.clone(), changes, built);
    drop(building);
    // The window's next answer, so that no request waits when this one stops holding.
    let next = answers
        .get(
            &question,
            memo::State {
                changes,
                recent_seq: recent_seq(state).await,
            },
            since,
        )
        .and_then(|hit| hit.build_next);
    if let Some(next) = next {
        tokio::spawn(build_ahead(state.clone(), question, next));
    }
    Ok(answer)
}

/// Builds and keeps the answer to `question` for the windows that start after `after` (the
/// last start the answer in use holds for), ahead of the requests that will need it. It is
/// exact whenever it is sent: rows committed later change the counters it was built with.
async fn build_ahead(state: AppState, question: Question, after: DateTime<Utc>) {
    // No `created_at` lies strictly between `after` and `after + step`, the finest step of
    // the column on the backend; so the rows from there on are the rows after `after`.
    let step = match state.db.get_database_backend() {
        sea_orm::DatabaseBackend::Postgres => chrono::TimeDelta::microseconds(1),
        _ => chrono::TimeDelta::milliseconds(1),
    };
    let _building = state.answers.build(&question).await;
    let built = async {
        let changes = rollup::changes(&state.db).await?.unwrap_or_default();
        Ok::<_, DbErr>((changes, build(&state, &question, Some(after + step)).await?))
    };
    match built.await {
        Ok((changes, mut built)) => {
            if let Some(window) = &mut built.window {
                window.since = after + chrono::TimeDelta::nanoseconds(1);
            }
            keep(&state, question, changes, built);
        }
        Err(error) => tracing::warn!(error = %error, "building a telemetry answer ahead failed"),
    }
}

/// A built answer and what it depends on.
struct Built {
    answer: JsonBytes<TelemetryResponse>,
    recent_seq: u64,
    window: Option<Window>,
}

fn keep(state: &AppState, question: Question, changes: rollup::Changes, built: Built) {
    state.answers.put(
        question,
        memo::State {
            changes,
            recent_seq: built.recent_seq,
        },
        built.window,
        built.answer,
    );
}

/// Builds the answer to `question` for a window starting at `since`.
async fn build(
    state: &AppState,
    question: &Question,
    since: Option<DateTime<Utc>>,
) -> Result<Built, DbErr> {
    let filter = TelemetryFilter {
        since,
        ..question.filter.clone()
    };
    let items = queries::list_items(&state.db, &filter, question.before, question.limit).await?;
    let summary = queries::summarize(&state.db, &filter).await?;
    let recent = match state
        .runtime
        .broadcast
        .call(BroadcastMessage::GetRecent, None)
        .await
    {
        Ok(CallResult::Success(events)) => events,
        _ => Vec::new(),
    };
    let recent_seq = recent.last().map_or(0, |event| event.seq);
    let answer = JsonBytes::new(&TelemetryResponse {
        items: items.into_iter().map(GenerationItem::from).collect(),
        summary: summary.into(),
        recent: recent
            .into_iter()
            .filter(|event| {
                filter
                    .media_type
                    .is_none_or(|media| event.data.media_type == media.as_str())
            })
            .collect(),
    });
    let window = match since {
        Some(since) if state.answers.enabled() => Some(Window {
            since,
            until: queries::same_summary_until(since, queries::oldest(&state.db, &filter).await?),
        }),
        _ => None,
    };
    Ok(Built {
        answer,
        recent_seq,
        window,
    })
}

/// The sequence number of the newest recent event; 0 when the BroadcastActor cannot say,
/// which no kept answer was built with unless the buffer was empty.
async fn recent_seq(state: &AppState) -> u64 {
    match state
        .runtime
        .broadcast
        .call(BroadcastMessage::GetRecentSeq, None)
        .await
    {
        Ok(CallResult::Success(seq)) => seq,
        _ => 0,
    }
}

fn default_limit() -> u64 {
    50
}

/// What `before` takes, for the 400 that refuses anything else.
pub const BEFORE_ALLOWED: &str = "an item id (an integer from 1 to 999999999999999999) or an \
     RFC 3339 time such as 2026-12-04T16:00:00Z or 2026-12-04T17:00:00.250+01:00";

/// Reads `before`: an item id, or an RFC 3339 time.
fn parse_cursor(text: &str) -> Result<Cursor, String> {
    let refused = || format!("before: expected {BEFORE_ALLOWED}, not {text:?}");
    if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
        return match text.parse::<i64>() {
            Ok(id) if (1..=999_999_999_999_999_999).contains(&id) && !text.starts_with('0') => {
                Ok(Cursor::Id(id))
            }
            _ => Err(refused()),
        };
    }
    DateTime::parse_from_rfc3339(text)
        .map(|at| Cursor::Time(at.with_timezone(&Utc)))
        .map_err(|_| refused())
}

/// The query parameters of the route and what each allows, for the 400 that refuses a value
/// poem-openapi cannot parse or that fails a validator (its own message names neither).
/// Keep in step with the validators above.
pub const QUERY_PARAMETERS: [(&str, &str); 9] = [
    ("limit", "an integer from 1 to 1000"),
    ("minutes", "an integer from 1 to 5256000"),
    ("media_type", "one of image, video"),
    ("model_name", TEXT_ALLOWED),
    ("user_id", TEXT_ALLOWED),
    ("persona_id", TEXT_ALLOWED),
    ("device", "1 to 64 characters, none of them NUL"),
    ("status", "one of succeeded, failed, cancelled"),
    ("before", BEFORE_ALLOWED),
];

const TEXT_ALLOWED: &str = "1 to 256 characters, none of them NUL";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_takes_an_item_id_or_an_rfc_3339_time_and_nothing_else() {
        assert_eq!(parse_cursor("42"), Ok(Cursor::Id(42)));
        assert_eq!(
            parse_cursor("2026-12-04T17:00:00.5+01:00"),
            Ok(Cursor::Time(
                DateTime::parse_from_rfc3339("2026-12-04T16:00:00.5Z")
                    .unwrap()
                    .with_timezone(&Utc)
            ))
        );
        for refused in [
            "0",
            "-1",
            "+1",
            "1.5",
            "9223372036854775808",
            "2026-12-04",
            "",
            "x",
        ] {
            let message = parse_cursor(refused).unwrap_err();
            assert!(
                message.starts_with(&format!("before: expected {BEFORE_ALLOWED}")),
                "{refused:?}: {message}"
            );
        }
    }
}
