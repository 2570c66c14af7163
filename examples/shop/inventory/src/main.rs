//! `shop-inventory`: the shop's inventory service. Its writer serves the
//! `inventory` aggregate (stock added, reserved, released) in the bounded
//! context `inventory` (topics `<prefix>.inventory.*`: `esk topics init
//! --context inventory`). Configured by the environment alone
//! (`KAFKA_BOOTSTRAP_SERVERS`, `ESK_TOPIC_PREFIX`, `ESK_DATA_DIR`,
//! `ESK_WRITER_HTTP`, and the rest of `esk-writer --help`).

use esk::Parser as _;

/// The inventory context.
const CONTEXT: &str = "inventory";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    esk::service_main("shop-inventory", |shutdown| async move {
        if let Some(arg) = std::env::args().nth(1) {
            anyhow::bail!("shop-inventory takes no arguments (got '{arg}'): it is configured by ESK_* variables");
        }
        let writer = esk::writer::Config::try_parse_from(["shop-inventory"])?;
        esk::Writer::new(writer).context(CONTEXT).aggregate::<esk::builtin::Inventory>().run(shutdown).await
    })
    .await
}
