//! The `Allow` header of 405 answers (RFC 9110), from the paths and methods of the OpenAPI
//! document, so it always names what the routes really take.

use std::collections::BTreeMap;

/// The methods of every documented path.
#[derive(Debug, Clone, Default)]
pub struct AllowedMethods {
    routes: Vec<(Vec<String>, String)>,
}

impl AllowedMethods {
    /// Reads the paths of an OpenAPI document (JSON).
    pub fn from_spec(spec: &str) -> Self {
        let document: serde_json::Value = serde_json::from_str(spec).unwrap_or_default();
        let mut routes = Vec::new();
        if let Some(paths) = document["paths"].as_object() {
            for (template, operations) in paths {
                let methods: BTreeMap<String, ()> = operations
                    .as_object()
                    .map(|ops| ops.keys().map(|m| (m.to_uppercase(), ())).collect())
                    .unwrap_or_default();
                let methods = methods.into_keys().collect::<Vec<_>>().join(", ");
                routes.push((segments(template), methods));
            }
        }
        AllowedMethods { routes }
    }

    /// The methods a request path takes, as an `Allow` value.
    pub fn allow(&self, path: &str) -> Option<&str> {
        let path = segments(path);
        self.routes
            .iter()
            .find(|(template, _)| {
                template.len() == path.len()
                    && template.iter().zip(&path).all(|(t, p)| {
                        (t.starts_with('{') && t.ends_with('}') && !p.is_empty()) || t == p
                    })
            })
            .map(|(_, methods)| methods.as_str())
    }
}

fn segments(path: &str) -> Vec<String> {
    path.trim_end_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_concrete_paths() {
        let allowed = AllowedMethods::from_spec(&crate::api::openapi_json());
        assert_eq!(allowed.allow("/api/jobs"), Some("POST"));
        assert_eq!(allowed.allow("/api/jobs/"), Some("POST"));
        assert_eq!(allowed.allow("/api/jobs/abc/cancel"), Some("POST"));
        assert_eq!(
            allowed.allow("/api/system/telemetry/generation"),
            Some("GET")
        );
        assert_eq!(allowed.allow("/nowhere"), None);
    }
}
