//! The committed OpenAPI document is the one the code generates.

#[test]
fn the_committed_openapi_document_is_current() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .expect("openapi/openapi.json is committed");
    let generated = seidra::api::openapi_json() + "\n";
    assert!(
        committed == generated,
        "openapi/openapi.json is stale: run `cargo run -- openapi` and commit the result"
    );
}

#[test]
fn every_query_parameter_of_the_telemetry_route_has_its_allowed_values_for_400_answers() {
    let document: serde_json::Value = serde_json::from_str(&seidra::api::openapi_json()).unwrap();
    let mut documented: Vec<&str> =
        document["paths"]["/api/system/telemetry/generation"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|parameter| parameter["in"] == "query")
            .map(|parameter| parameter["name"].as_str().unwrap())
            .collect();
    documented.sort();
    let mut described: Vec<&str> = seidra::api::telemetry::QUERY_PARAMETERS
        .iter()
        .map(|(name, _)| *name)
        .collect();
    described.sort();
    assert_eq!(described, documented);
}
