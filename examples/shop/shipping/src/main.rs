//! `shop-shipping`: the shop's shipping service, a projector of the
//! `shipments` model over the orders context's events (`GET
//! /shipments/{order}`). It writes nothing, so it has no context of its own.
//! Configured by the environment alone (`KAFKA_BOOTSTRAP_SERVERS`,
//! `ESK_TOPIC_PREFIX`, `ESK_DATA_DIR`, `ESK_PROJECTOR_HTTP`, and the rest of
//! `esk-projector --help`).

use esk::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    esk::service_main("shop-shipping", |shutdown| async move {
        if let Some(arg) = std::env::args().nth(1) {
            anyhow::bail!("shop-shipping takes no arguments (got '{arg}'): it is configured by ESK_* variables");
        }
        let projector = esk::projector::Config::try_parse_from(["shop-shipping"])?;
        esk::Projector::new(projector)
            .projection(shop_shipping::Shipments)
            .routes(shop_shipping::routes())
            .run(shutdown)
            .await
    })
    .await
}
