//! `shop-orders`: the orders service, a writer of the `order` aggregate and
//! a projector of the `orders` model in one process. Configured by the
//! environment alone, as esk's services can be (`KAFKA_BOOTSTRAP_SERVERS`,
//! `ESK_TOPIC_PREFIX`, `ESK_DATA_DIR`, `ESK_WRITER_HTTP`,
//! `ESK_PROJECTOR_HTTP`, `ESK_CHECKOUT_TIMEOUT` (the checkout saga's, default
//! 30s), and the rest of `esk-writer --help` and
//! `esk-projector --help`); it takes no arguments. Either part stopping
//! stops the other, and the process waits for both. Its writer serves the
//! bounded context `orders` (topics `<prefix>.orders.*`).

use esk::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    esk::service_main("shop-orders", |shutdown| async move {
        if let Some(arg) = std::env::args().nth(1) {
            anyhow::bail!("shop-orders takes no arguments (got '{arg}'): it is configured by ESK_* variables");
        }
        let writer = esk::writer::Config::try_parse_from(["shop-orders"])?;
        let projector = esk::projector::Config::try_parse_from(["shop-orders"])?;
        // The orders context: its own topics (`esk topics init --context
        // orders`) and writer group; `order` is claimed for it at start.
        let writer = esk::Writer::new(writer).context(shop_orders::CONTEXT).aggregate::<shop_orders::Order>();
        // The checkout saga: ESK_CHECKOUT_TIMEOUT (default 30s) bounds a checkout.
        let timeout = match std::env::var("ESK_CHECKOUT_TIMEOUT") {
            Ok(t) => esk::parse_duration(&t).map_err(|e| anyhow::anyhow!("ESK_CHECKOUT_TIMEOUT: {e}"))?,
            Err(_) => shop_orders::checkout::Checkout::default().timeout,
        };
        let projector = esk::Projector::new(projector)
            .projection(shop_orders::Orders)
            .process(shop_orders::checkout::Checkout { timeout })
            .routes(shop_orders::routes());
        esk::run_both(writer, projector, shutdown).await
    })
    .await
}
