//! `shop-payments`: the shop's payments service. Its writer serves the
//! `account` aggregate in the bounded context `payments` (topics
//! `<prefix>.payments.*`: `esk topics init --context payments`); its projector
//! serves the `accounts` read model (`GET /accounts/{id}`). Configured by the
//! environment alone (`KAFKA_BOOTSTRAP_SERVERS`, `ESK_TOPIC_PREFIX`,
//! `ESK_DATA_DIR`, `ESK_WRITER_HTTP`, `ESK_PROJECTOR_HTTP`, and the rest of
//! `esk-writer --help` and `esk-projector --help`); either part stopping
//! stops the other.

use esk::Parser as _;

/// The payments context.
const CONTEXT: &str = "payments";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    esk::service_main("shop-payments", |shutdown| async move {
        if let Some(arg) = std::env::args().nth(1) {
            anyhow::bail!("shop-payments takes no arguments (got '{arg}'): it is configured by ESK_* variables");
        }
        let writer = esk::writer::Config::try_parse_from(["shop-payments"])?;
        let projector = esk::projector::Config::try_parse_from(["shop-payments"])?;
        let writer = esk::Writer::new(writer).context(CONTEXT).aggregate::<esk::builtin::Account>();
        let projector =
            esk::Projector::new(projector).projection(esk::builtin::Accounts).routes(esk::builtin::accounts_routes());
        esk::run_both(writer, projector, shutdown).await
    })
    .await
}
