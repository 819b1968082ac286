//! Answers of the telemetry endpoint, kept serialised while they stay exact.
//!
//! Dashboards ask the same questions every few seconds, and on a large table the answer costs
//! far more to build than to send. An answer is sent again only while nothing it depends on
//! has moved:
//! - the table and its rollup: `generation_metrics_rollup_state.row_changes`, which the
//!   table's triggers count whoever writes (this writer, another host, a purge, the `sqlite3`
//!   shell), and `rolled_changes`, which moves with the rollup, are the numbers read before
//!   the answer was built;
//! - the recent buffer: its newest event is the same;
//! - the window: its start has not passed the oldest matching row nor the next whole hour,
//!   where the summary's split into rows and rollup cells changes.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::sync::Mutex;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use poem::{IntoResponse, Response};
use poem_openapi::payload::Payload;
use poem_openapi::registry::{MetaSchemaRef, Registry};
use poem_openapi::types::{ToJSON, Type};

use crate::storage::TelemetryFilter;
use crate::storage::queries::Cursor;
use crate::storage::rollup::Changes;

/// A JSON document of schema `T`, already serialised.
pub struct JsonBytes<T> {
    bytes: Bytes,
    schema: PhantomData<fn() -> T>,
}

impl<T: ToJSON> JsonBytes<T> {
    /// Serialises `value`.
    pub fn new(value: &T) -> Self {
        JsonBytes {
            bytes: Bytes::from(value.to_json_string()),
            schema: PhantomData,
        }
    }
}

impl<T> Clone for JsonBytes<T> {
    fn clone(&self) -> Self {
        JsonBytes {
            bytes: self.bytes.clone(),
            schema: PhantomData,
        }
    }
}

impl<T: Type> Payload for JsonBytes<T> {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: Type> IntoResponse for JsonBytes<T> {
    fn into_response(self) -> Response {
        Response::builder()
            .content_type(Self::CONTENT_TYPE)
            .body(self.bytes)
    }
}

/// Everything a request asks, the window as a length: equal questions have equal answers
/// while the state they were answered in holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Question {
    /// Items asked for.
    pub limit: u64,
    /// The window's length.
    pub minutes: Option<u32>,
    /// The other filters (`since` unset).
    pub filter: TelemetryFilter,
    /// Where the page of items starts.
    pub before: Option<Cursor>,
}

/// What an answer depended on when it was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// The table's and the rollup's change counters, read before the answer was built.
    pub changes: Changes,
    /// The newest event of the recent buffer (0 when empty).
    pub recent_seq: u64,
}

/// The span of window starts an answer holds for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The window start it was built for.
    pub since: DateTime<Utc>,
    /// The latest window start it still holds for.
    pub until: DateTime<Utc>,
}

struct Entry<T> {
    state: State,
    window: Option<Window>,
    answer: JsonBytes<T>,
    /// Whether the answer for the window that follows has been asked for.
    successor_asked: bool,
}

/// The answers kept for one question: the one in use and, for a window, the one that takes
/// over when it stops holding.
struct Kept<T> {
    entries: Vec<Entry<T>>,
    stored: u64,
}

/// Locks that let one request at a time build the answer to a question (striped by hash).
const BUILDERS: usize = 16;

/// A bounded map of questions to serialised answers.
pub struct Answers<T> {
    capacity: usize,
    entries: Mutex<(HashMap<Question, Kept<T>>, u64)>,
    builders: [tokio::sync::Mutex<()>; BUILDERS],
}

/// A kept answer, and where the answer that follows starts when it should be built now
/// (before it is needed, so that no request waits for it).
pub struct Hit<T> {
    /// The answer.
    pub answer: JsonBytes<T>,
    /// The window start after which the next answer holds (not at it), when nobody has
    /// built it yet.
    pub build_next: Option<DateTime<Utc>>,
}

impl<T> Answers<T> {
    /// Keeps answers to at most `capacity` questions; 0 keeps none.
    pub fn new(capacity: usize) -> Self {
        Answers {
            capacity,
            entries: Mutex::new((HashMap::new(), 0)),
            builders: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
        }
    }

    /// Waits until no other request builds an answer to `question` (or to a question that
    /// shares its lock): requests that miss together then build it once, not each.
    pub async fn build(&self, question: &Question) -> tokio::sync::MutexGuard<'_, ()> {
        let mut hasher = std::hash::DefaultHasher::new();
        question.hash(&mut hasher);
        self.builders[hasher.finish() as usize % BUILDERS]
            .lock()
            .await
    }

    /// Whether it keeps anything.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// The answer to `question` built in `state`, if it holds for a window starting at `since`.
    pub fn get(
        &self,
        question: &Question,
        state: State,
        since: Option<DateTime<Utc>>,
    ) -> Option<Hit<T>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let kept = entries.0.get_mut(question)?;
        let latest_start = kept
            .entries
            .iter()
            .filter(|entry| entry.state == state)
            .filter_map(|entry| entry.window.map(|window| window.since))
            .max();
        let entry = kept.entries.iter_mut().find(|entry| {
            entry.state == state
                && match (entry.window, since) {
                    (None, None) => true,
                    (Some(window), Some(since)) => window.since <= since && since <= window.until,
                    _ => false,
                }
        })?;
        let mut build_next = None;
        if let Some(window) = entry.window
            && !entry.successor_asked
            && latest_start == Some(window.since)
        {
            entry.successor_asked = true;
            build_next = Some(window.until);
        }
        Some(Hit {
            answer: entry.answer.clone(),
            build_next,
        })
    }

    /// Keeps `answer`, built in `state` for `window`, beside the one it follows (answers built
    /// in another state go); makes room by dropping the question kept longest ago.
    pub fn put(
        &self,
        question: Question,
        state: State,
        window: Option<Window>,
        answer: JsonBytes<T>,
    ) {
        if !self.enabled() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (map, clock) = &mut *entries;
        *clock += 1;
        if map.len() >= self.capacity && !map.contains_key(&question) {
            let oldest = map
                .iter()
                .min_by_key(|(_, kept)| kept.stored)
                .map(|(question, _)| question.clone());
            if let Some(oldest) = oldest {
                map.remove(&oldest);
            }
        }
        let kept = map.entry(question).or_insert_with(|| Kept {
            entries: Vec::new(),
            stored: 0,
        });
        kept.stored = *clock;
        kept.entries
            .retain(|entry| entry.state == state && entry.window.is_some() && window.is_some());
        kept.entries.push(Entry {
            state,
            window,
            answer,
            successor_asked: false,
        });
        // The answer in use and the one that follows it.
        kept.entries
            .sort_by_key(|entry| entry.window.map(|window| window.since));
        while kept.entries.len() > 2 {
            kept.entries.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn question(limit: u64) -> Question {
        Question {
            limit,
            minutes: Some(60),
            filter: TelemetryFilter::default(),
            before: None,
        }
    }

    fn answer(text: &str) -> JsonBytes<String> {
        JsonBytes::new(&text.to_owned())
    }

    fn body(answer: JsonBytes<String>) -> String {
        String::from_utf8(answer.bytes.to_vec()).unwrap()
    }

    const STATE: State = State {
        changes: Changes { rows: 7, rolled: 7 },
        recent_seq: 3,
    };

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn an_answer_holds_only_in_its_state_and_window() {
        let answers = Answers::new(4);
        let window = Window {
            since: at(0),
            until: at(100),
        };
        answers.put(question(50), STATE, Some(window), answer("a"));
        assert_eq!(
            answers
                .get(&question(50), STATE, Some(at(100)))
                .map(|hit| body(hit.answer)),
            Some("\"a\"".to_owned())
        );
        for (state, since) in [
            (
                State {
                    changes: Changes { rows: 8, rolled: 7 },
                    ..STATE
                },
                at(10),
            ),
            (
                State {
                    recent_seq: 4,
                    ..STATE
                },
                at(10),
            ),
            (STATE, at(101)),
            (STATE, at(-1)),
        ] {
            assert!(answers.get(&question(50), state, Some(since)).is_none());
        }
        assert!(answers.get(&question(50), STATE, None).is_none());
        assert!(answers.get(&question(10), STATE, Some(at(10))).is_none());
    }

    #[test]
    fn a_used_window_asks_once_for_its_successor_which_takes_over() {
        let answers = Answers::new(4);
        let window = |since, until| {
            Some(Window {
                since: at(since),
                until: at(until),
            })
        };
        answers.put(question(50), STATE, window(0, 100), answer("a"));
        let first = answers.get(&question(50), STATE, Some(at(10))).unwrap();
        assert_eq!(first.build_next, Some(at(100)));
        let again = answers.get(&question(50), STATE, Some(at(20))).unwrap();
        assert_eq!(again.build_next, None, "asked once");

        let after = |seconds| at(seconds) + chrono::TimeDelta::nanoseconds(1);
        let successor = Window {
            since: after(100),
            until: at(200),
        };
        answers.put(question(50), STATE, Some(successor), answer("b"));
        let hit = |since| {
            answers
                .get(&question(50), STATE, Some(at(since)))
                .map(|hit| (body(hit.answer), hit.build_next))
        };
        assert_eq!(hit(50), Some(("\"a\"".to_owned(), None)), "still in use");
        assert_eq!(hit(150), Some(("\"b\"".to_owned(), Some(at(200)))));

        let third = Window {
            since: after(200),
            until: at(300),
        };
        answers.put(question(50), STATE, Some(third), answer("c"));
        assert_eq!(hit(50), None, "two answers per question are kept");
        assert_eq!(hit(250).map(|(text, _)| text), Some("\"c\"".to_owned()));

        let moved = State {
            recent_seq: 4,
            ..STATE
        };
        answers.put(question(50), moved, window(0, 100), answer("d"));
        assert_eq!(hit(250), None, "answers of an earlier state go");
    }

    #[test]
    fn pages_are_answers_to_different_questions() {
        let answers = Answers::new(4);
        let page = |before| Question {
            before,
            ..question(50)
        };
        answers.put(page(Some(Cursor::Id(5))), STATE, None, answer("a"));
        assert!(
            answers
                .get(&page(Some(Cursor::Id(5))), STATE, None)
                .is_some()
        );
        for other in [None, Some(Cursor::Id(6)), Some(Cursor::Time(at(0)))] {
            assert!(
                answers.get(&page(other), STATE, None).is_none(),
                "{other:?}"
            );
        }
    }

    #[test]
    fn the_oldest_answer_makes_room_and_none_is_kept_at_capacity_zero() {
        let answers = Answers::new(2);
        for limit in 1..=3 {
            answers.put(question(limit), STATE, None, answer("x"));
        }
        let kept: Vec<u64> = (1..=3)
            .filter(|&limit| answers.get(&question(limit), STATE, None).is_some())
            .collect();
        assert_eq!(kept, [2, 3]);

        let none = Answers::new(0);
        none.put(question(1), STATE, None, answer("x"));
        assert!(none.get(&question(1), STATE, None).is_none());
    }
}
