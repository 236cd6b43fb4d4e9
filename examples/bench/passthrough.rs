//! The latency floor of a broker: a consumer that forwards every message to the output
//! topic at once, with no Postgres, no batching and no dedup.
//!
//! kdedup's path from the input timestamp to the application's read has two broker hops
//! (the input topic to kdedup's consumer, the output topic to the application's), each
//! held by the broker for up to its fetch wait. This forwarder has the same two hops with
//! kdedup's client settings (fetch wait, prefetch bound, an idempotent `acks=all`
//! producer with kdedup's `linger.ms` and compression), and nothing between them. Its
//! latency, measured by the same reader in the same run, is what any consume-and-forward
//! sidecar pays on that broker before it does any work of its own.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// Counts the produces the broker refused for good.
#[derive(Default)]
struct Refused(AtomicUsize);

impl ClientContext for Refused {}

impl ProducerContext for Refused {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A running forwarder; [`PassThrough::stop`] ends it and says how many it forwarded.
/// Dropped without that (the run failed), it stops all the same.
pub(super) struct PassThrough {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<usize>>>,
}

impl PassThrough {
    /// Starts forwarding `input` (`partitions` partitions, from the beginning) to the
    /// same partition of `output`, keeping each message's key, value, headers and
    /// timestamp. `fetch_wait_ms`: the consumer's `fetch.wait.max.ms`, kdedup's in the run
    /// it is compared with (empty: librdkafka's default).
    pub(super) fn start(
        brokers: &str,
        input: &str,
        output: &str,
        partitions: i32,
        fetch_wait_ms: &str,
    ) -> anyhow::Result<PassThrough> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            // Assigned, not subscribed: the group id only names it.
            .set("group.id", format!("{input}-pass-through"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // kdedup's prefetch bound (src/kafka/mod.rs).
            .set("queued.max.messages.kbytes", "16384");
        if !fetch_wait_ms.is_empty() {
            config.set("fetch.wait.max.ms", fetch_wait_ms);
        }
        let consumer: BaseConsumer = config.create().context("pass-through consumer")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(input, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        // kdedup's own producer settings, so that the floor follows them.
        let producer: BaseProducer<Refused> = kdedup::default_producer_config(brokers)
            .create_with_context(Refused::default())
            .context("pass-through producer")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let output = output.to_string();
        let thread = std::thread::spawn(move || forward(&consumer, &producer, &output, &stopping));
        Ok(PassThrough {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops forwarding (after flushing what was sent) and returns the messages forwarded
    /// and acknowledged; an error if the broker refused any.
    pub(super) fn stop(mut self) -> anyhow::Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("stopped once")
            .join()
            .map_err(|_| anyhow::anyhow!("the pass-through forwarder panicked"))?
    }
}

impl Drop for PassThrough {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn forward(
    consumer: &BaseConsumer,
    producer: &BaseProducer<Refused>,
    output: &str,
    stop: &AtomicBool,
) -> anyhow::Result<usize> {
    let mut forwarded = 0usize;
    while !stop.load(Ordering::Relaxed) {
        producer.poll(Duration::ZERO);
        let m = match consumer.poll(Duration::from_millis(10)) {
            None => continue,
            Some(Err(e)) => {
                // As kdedup's consumer: a broker error is logged, and the client retries.
                if let Some((_, reason)) = consumer.client().fatal_error() {
                    bail!("pass-through consumer: {reason}");
                }
                eprintln!("pass-through consumer: {e}");
                continue;
            }
            Some(Ok(m)) => m,
        };
        let headers = m.headers().map(|h| h.detach());
        let mut record: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(output).partition(m.partition());
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        if let Some(ts) = m.timestamp().to_millis() {
            record = record.timestamp(ts);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => bail!("pass-through produce: {e}"),
            }
        }
        forwarded += 1;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("pass-through flush")?;
    let refused = producer.context().0.load(Ordering::Relaxed);
    if refused > 0 {
        bail!("pass-through: the broker refused {refused} of {forwarded} messages");
    }
    Ok(forwarded)
}
