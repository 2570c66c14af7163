//! The OpenAPI 3.1 document, made from the handlers' annotations. A copy is
//! checked into the repository (`services/gateway/openapi.json`) and a test
//! fails when the code and the copy differ: `ESK_WRITE_OPENAPI=1 cargo test
//! -p esk-gateway openapi` writes it anew.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api;
use crate::console;
use crate::problem::Problem;

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "esk gateway",
        description = "esk over HTTP/JSON: appends with expected versions and idempotency keys, domain commands, \
                       paged stream reads, 2PC transactions across streams and bounded contexts, and live \
                       subscriptions as Server-Sent Events resumable with Last-Event-ID. Errors are RFC 9457 \
                       problems (`application/problem+json`) whose `type` is `urn:esk:problem:<class>`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        api::append, api::command, api::read, api::transact, api::transaction,
        api::subscribe_category, api::subscribe_all,
        console::transactions, console::categories, console::category_events,
        console::services, console::projections, console::dead_letters, console::replay,
        crate::health, crate::ready, crate::status, crate::metrics, document,
    ),
    components(schemas(
        Problem, api::AppendBody, api::NewEventDoc, api::Expected, api::Keyword, api::CommandBody,
        api::AppendedDoc, api::EventDoc, api::StreamPage, api::Direction, api::TransactionBody,
        api::ParticipantDoc, api::TxStatusDoc, api::ParticipantStateDoc, api::CommandDoc,
    )),
    modifiers(&AdminToken),
    tags(
        (name = "streams", description = "Appends, commands and reads of one stream"),
        (name = "transactions", description = "All-or-nothing writes across streams"),
        (name = "subscriptions", description = "Live events as Server-Sent Events"),
        (name = "console", description = "What the web console shows"),
        (name = "service", description = "The gateway itself"),
    ),
)]
pub struct ApiDoc;

struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("ESK_ADMIN_TOKEN, when the gateway has one"))
                    .build(),
            ),
        );
    }
}

/// The document as served and as checked in.
pub fn json() -> String {
    let mut text = ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_openapi_document_is_the_code_s() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
        let made = json();
        if std::env::var_os("ESK_WRITE_OPENAPI").is_some() {
            std::fs::write(&path, &made).unwrap();
        }
        let kept = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            kept == made,
            "services/gateway/openapi.json differs from what the code makes: run `ESK_WRITE_OPENAPI=1 cargo test -p \
             esk-gateway openapi` and commit it"
        );
        let doc: serde_json::Value = serde_json::from_str(&made).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    }
}
