//! Two relays against one (`--only relays`, full runs): [`bench/relays.py`] runs one kdedup
//! replica, then two in one consumer group, each round on a fresh topic and schema, and
//! prints each round as JSON; this module runs it on the bench's services and reports it.
//!
//! [`bench/relays.py`]: ../../bench/relays.py

use std::process::{Command, Stdio};

use anyhow::Context;

const SCRIPT: &str = "bench/relays.py";

/// One round: events/s of one replica and of two, and the relay streams each replica held
/// at the end (each holds those of its own partitions).
#[derive(Debug, serde::Deserialize)]
pub(super) struct RelayRound {
    pub one: f64,
    pub two: f64,
    pub streams_one: Vec<f64>,
    pub streams_two: Vec<f64>,
}

impl super::Bench {
    pub(super) fn relays(&self, rounds: usize, n: usize) -> anyhow::Result<Vec<RelayRound>> {
        let log = self.tmp.join(format!("logs/{}-relays.log", self.run_id));
        let out = Command::new(super::batched::python())
            .arg(self.root.join(SCRIPT))
            .args([
                "--rounds",
                &rounds.to_string(),
                "--n",
                &n.to_string(),
                "--json",
            ])
            .env("KDEDUP_TEST_BROKERS", &self.brokers)
            .env("KDEDUP_TEST_DATABASE_URL", &self.db_url)
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .output()
            .with_context(|| format!("run {SCRIPT}"))?;
        super::stdout_of(SCRIPT, &out, &log)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("{SCRIPT} printed {l:?}")))
            .collect()
    }
}

impl super::Report {
    pub(super) fn render_relays(&self, s: &mut String) {
        use std::fmt::Write;
        if self.relays.is_empty() {
            return;
        }
        let _ = writeln!(s, "\n## Two relays against one\n");
        let _ = writeln!(
            s,
            "[`relays.py`](relays.py): per round, one kdedup replica, then two in one consumer group, each on a fresh \
             4-partition topic and schema of its own; the replicas are spread over the partitions, paused (SIGSTOP) \
             while the input ({} events with distinct ids) is produced, and resumed together on that backlog; the rate \
             is the events forwarded (acknowledged on the output topic), summed over the replicas, per second from the \
             resume. Each replica relays the \
             streams of its own partitions (streams held, per replica, at the end). Both replicas, Postgres and the \
             broker share this machine's cores.\n",
            self.relays_n
        );
        let _ = writeln!(
            s,
            "| round | one replica, events/s (streams) | two replicas, events/s (streams) | two / one |\n|---:|---:|---:|---:|"
        );
        let streams = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(" + ")
        };
        for (i, r) in self.relays.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {:.0} ({}) | {:.0} ({}) | {:.2}× |",
                i + 1,
                r.one,
                streams(&r.streams_one),
                r.two,
                streams(&r.streams_two),
                r.two / r.one
            );
        }
    }
}
