//! `openapi/asyncapi.yaml` against what a running service really sends on the channel
//! `system`: real jobs that succeed, fail and are cancelled, and a `reload` notice. Every
//! message must match the payload schema of its type, every type seen must be in the
//! document and every type in the document must be seen, and a message with any field renamed
//! must not match.

use std::collections::{BTreeMap, BTreeSet};

use jsonschema::{Draft, Registry, Validator};
use serde_json::{Value, json};

use crate::channel::{connect_with, next_json};
use crate::helpers::{AppOptions, TestApp, small_image, small_video, spawn_app_with};

/// The URI the document is registered under, for the `$ref`s that pick a message's payload.
const DOCUMENT_URI: &str = "urn:seidra:asyncapi";

/// The payload validators of the document's messages, by message type.
struct Document {
    validators: BTreeMap<String, Validator>,
}

impl Document {
    fn load() -> Document {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/asyncapi.yaml");
        let text = std::fs::read_to_string(path).expect("openapi/asyncapi.yaml");
        let document: Value = serde_yaml::from_str(&text).expect("the document is YAML");
        check_structure(&document);

        // AsyncAPI's default schema format is JSON Schema draft 7 (with a few more keywords).
        let registry = Registry::new()
            .draft(Draft::Draft7)
            .add(DOCUMENT_URI, document.clone())
            .expect("the document's URI")
            .prepare()
            .expect("the document's references resolve");
        let messages = document["components"]["messages"]
            .as_object()
            .expect("components.messages");
        let validators = messages
            .iter()
            .map(|(key, message)| {
                let message_type = message["payload"]["properties"]["type"]["const"]
                    .as_str()
                    .unwrap_or_else(|| panic!("message {key}: payload.properties.type.const"));
                assert_eq!(message["name"], message_type, "message {key}: its name");
                let pointer = json!({
                    "$ref": format!("{DOCUMENT_URI}#/components/messages/{key}/payload")
                });
                let validator = jsonschema::options()
                    .with_draft(Draft::Draft7)
                    .with_registry(&registry)
                    .should_validate_formats(true)
                    .build(&pointer)
                    .unwrap_or_else(|error| panic!("message {key}: a valid schema: {error}"));
                (message_type.to_owned(), validator)
            })
            .collect();
        Document { validators }
    }

    /// Why `message` does not match its type's payload schema; empty when it does.
    fn errors(&self, message: &Value) -> Vec<String> {
        let message_type = message["type"].as_str().unwrap_or_default();
        let Some(validator) = self.validators.get(message_type) else {
            return vec![format!("type {message_type:?} is not in the document")];
        };
        validator
            .iter_errors(message)
            .map(|error| format!("{} at {}", error, error.instance_path()))
            .collect()
    }
}

/// The parts of the document the channel's clients rely on: where the channel is, how to
/// authenticate, and that the channel and its operation list every message.
fn check_structure(document: &Value) {
    assert_eq!(document["asyncapi"], "3.0.0");
    let channel = &document["channels"]["system"];
    assert_eq!(channel["address"], "/api/system/ws");
    let binding = &channel["bindings"]["ws"];
    assert_eq!(binding["method"], "GET");
    for parameter in ["token", "after_seq"] {
        assert!(
            binding["query"]["properties"][parameter].is_object(),
            "the ws binding names the {parameter} query parameter"
        );
    }
    let description = channel["description"].as_str().unwrap_or_default();
    for code in ["1001", "4001", "4008"] {
        assert!(
            description.contains(code),
            "the channel's description explains close code {code}"
        );
    }
    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["queryToken"]["in"], "query");
    assert_eq!(schemes["queryToken"]["name"], "token");

    let declared: BTreeSet<String> = document["components"]["messages"]
        .as_object()
        .expect("components.messages")
        .keys()
        .map(|key| format!("#/components/messages/{key}"))
        .collect();
    let in_channel: BTreeSet<String> = channel["messages"]
        .as_object()
        .expect("channels.system.messages")
        .values()
        .map(|message| message["$ref"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(in_channel, declared, "the channel lists every message");
    let operation = &document["operations"]["sendSystemMessages"];
    assert_eq!(operation["action"], "send");
    let in_operation: BTreeSet<String> = operation["messages"]
        .as_array()
        .expect("the operation's messages")
        .iter()
        .map(|message| {
            let reference = message["$ref"].as_str().unwrap_or_default();
            let key = reference
                .strip_prefix("#/channels/system/messages/")
                .expect("a message of the channel");
            channel["messages"][key]["$ref"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(in_operation, declared, "the operation sends every message");
}

/// Every copy of `message` with one field renamed, at the top and inside `data`, named by the
/// field's path. (`data.extra` is open: its keys are documented, not pinned.)
fn renamed_fields(message: &Value) -> Vec<(String, Value)> {
    let mut copies = Vec::new();
    let paths: [&[&str]; 2] = [&[], &["data"]];
    for path in paths {
        let mut target = message;
        for key in path {
            target = &target[*key];
        }
        let Some(object) = target.as_object() else {
            continue;
        };
        for key in object.keys() {
            let mut copy = message.clone();
            let mut inner = &mut copy;
            for step in path {
                inner = &mut inner[*step];
            }
            let inner = inner.as_object_mut().unwrap();
            let value = inner.remove(key).unwrap();
            inner.insert(format!("{key}_renamed"), value);
            copies.push((format!("{}/{key}", path.join("/")), copy));
        }
    }
    copies
}

/// Submits a job and asks for it to be cancelled at once.
async fn submit_and_cancel(app: &TestApp, body: Value) -> String {
    let id = app.submit(body).await;
    assert_eq!(app.cancel(&id).await, 202, "cancel {id}");
    id
}

#[tokio::test]
async fn every_message_the_service_sends_matches_the_asyncapi_document() {
    let document = Document::load();
    // A small queue, so that a client asking for the first messages later gets `reload`.
    let app = spawn_app_with(AppOptions {
        client_queue: 8,
        ..AppOptions::default()
    })
    .await;
    let mut socket = connect_with(&app, &app.token, "").await;

    let mut awaited = BTreeMap::new();
    awaited.insert(app.submit(small_image(1)).await, "job.finished");
    awaited.insert(app.submit(small_video(2)).await, "job.finished");
    let mut unknown_scheduler = small_image(3);
    unknown_scheduler["scheduler"] = json!("euler");
    awaited.insert(app.submit(unknown_scheduler).await, "job.failed");
    // Many steps, so that it cannot end before the cancel reaches it.
    let mut long = small_image(4);
    long["steps"] = json!(200);
    awaited.insert(submit_and_cancel(&app, long).await, "job.cancelled");

    let mut messages = Vec::new();
    while !awaited.is_empty() {
        let message = next_json(&mut socket).await;
        let job_id = message["data"]["job_id"].as_str().unwrap_or_default();
        if awaited.get(job_id) == message["type"].as_str().as_ref() {
            awaited.remove(job_id);
        }
        messages.push(message);
    }
    let oldest_wanted = messages[0]["seq"].as_u64().unwrap() - 1;
    let mut late = connect_with(&app, &app.token, &format!("&after_seq={oldest_wanted}")).await;
    messages.push(next_json(&mut late).await);

    let mut seen = BTreeMap::new();
    for message in &messages {
        let errors = document.errors(message);
        assert!(errors.is_empty(), "{message}\ndoes not match: {errors:#?}");
        for field in ["type", "channel", "seq", "emitted_at", "data"] {
            assert!(
                message.get(field).is_some(),
                "{message}\nlacks the envelope's {field}"
            );
        }
        let message_type = message["type"].as_str().unwrap().to_owned();
        seen.entry(message_type).or_insert(message);
    }
    let documented: BTreeSet<&String> = document.validators.keys().collect();
    assert_eq!(
        seen.keys().collect::<BTreeSet<_>>(),
        documented,
        "the service sent every documented type and no other"
    );

    // Formats are checked, not only types.
    let mut untimely = seen["job.queued"].clone();
    untimely["emitted_at"] = json!("yesterday");
    assert!(
        !document.errors(&untimely).is_empty(),
        "emitted_at must be a date-time"
    );

    // The schemas pin every field's name: a renamed one fails.
    for (message_type, message) in &seen {
        for (field, copy) in renamed_fields(message) {
            assert!(
                !document.errors(&copy).is_empty(),
                "{message_type}: renaming {field} still matches the document"
            );
        }
    }
    app.stop().await;
}
