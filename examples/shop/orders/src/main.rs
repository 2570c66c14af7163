//! `shop-orders`: the orders service, a writer of the `order` aggregate and
//! a projector of the `orders` model in one process. Configured as esk's
//! services are, by environment (`KAFKA_BOOTSTRAP_SERVERS`,
//! `ESK_TOPIC_PREFIX`, `ESK_DATA_DIR`, `ESK_WRITER_HTTP`,
//! `ESK_PROJECTOR_HTTP`, ...).

use esk::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    esk::service_main("shop-orders", |shutdown| async move {
        let writer = esk::writer::Config::try_parse_from(["shop-orders"])?;
        let projector = esk::projector::Config::try_parse_from(["shop-orders"])?;
        let writer = esk::Writer::new(writer).aggregate::<shop_orders::Order>().run(shutdown.clone());
        let projector = esk::Projector::new(projector)
            .projection(shop_orders::Orders)
            .routes(shop_orders::routes())
            .run(shutdown.clone());
        // Either one stopping stops the other.
        let stop = || shutdown.cancel();
        tokio::try_join!(
            async {
                let r = writer.await;
                stop();
                r
            },
            async {
                let r = projector.await;
                stop();
                r
            }
        )?;
        Ok(())
    })
    .await
}
