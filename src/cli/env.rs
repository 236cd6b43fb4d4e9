//! Where configuration comes from besides the flags: the process environment, read
//! through a small trait so tests pass a map instead of mutating the environment.

use std::collections::BTreeMap;

use super::KAFKA_ENV_PREFIX;

/// Reads configuration that clap does not see. A trait so tests pass a map instead of
/// mutating the process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Every `KDEDUP_*` variable `kdedup run` reads, for checks against deployment manifests.
pub fn is_known_env_var(name: &str) -> bool {
    if name.starts_with(KAFKA_ENV_PREFIX) {
        return true;
    }
    use clap::CommandFactory;
    let cli = super::Cli::command();
    let known_extra = ["KDEDUP_LOG", "KDEDUP_LOG_FORMAT"];
    known_extra.contains(&name)
        || cli.get_subcommands().any(|sub| {
            sub.get_arguments()
                .any(|a| a.get_env().is_some_and(|e| e == name))
        })
}

/// Every `KDEDUP_*` variable a setting reads (`KDEDUP_KAFKA_*` aside), sorted.
pub fn known_env_vars() -> Vec<String> {
    use clap::CommandFactory;
    let cli = super::Cli::command();
    let mut names: Vec<String> = cli
        .get_subcommands()
        .flat_map(|sub| sub.get_arguments())
        .filter_map(|a| a.get_env())
        .filter_map(|e| e.to_str())
        .filter(|e| e.starts_with("KDEDUP_"))
        .map(str::to_string)
        .chain(["KDEDUP_LOG".to_string(), "KDEDUP_LOG_FORMAT".to_string()])
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A variable Kubernetes sets in every pod for each Service of its namespace ("service
/// links"): for a Service named `kdedup` or `kdedup-kafka`, `KDEDUP_SERVICE_HOST`,
/// `KDEDUP_KAFKA_PORT_9092_TCP_ADDR` and so on. They are not settings: kdedup neither
/// reads them nor hands them to librdkafka.
pub fn is_service_link(name: &str) -> bool {
    if name.ends_with("_SERVICE_HOST") || name.ends_with("_SERVICE_PORT") || name.ends_with("_PORT")
    {
        return true;
    }
    if name.contains("_SERVICE_PORT_") {
        return true;
    }
    // <SVC>_PORT_<port>_<PROTOCOL>[_PROTO|_PORT|_ADDR]
    let parts: Vec<&str> = name.split('_').collect();
    parts.windows(3).enumerate().any(|(i, w)| {
        w[0] == "PORT"
            && !w[1].is_empty()
            && w[1].bytes().all(|b| b.is_ascii_digit())
            && matches!(w[2], "TCP" | "UDP" | "SCTP")
            && match parts.len() - (i + 3) {
                0 => true,
                1 => matches!(parts[i + 3], "PROTO" | "PORT" | "ADDR"),
                _ => false,
            }
    })
}

/// The `KDEDUP_*` variables of `env` that no setting reads (a typo such as
/// `KDEDUP_GROUPID`, or a setting another version has), each with the known name closest
/// to it when one is close. Service links and `KDEDUP_KAFKA_*` are not reported.
pub fn unknown_env_vars(env: &dyn Env) -> Vec<(String, Option<String>)> {
    let known = known_env_vars();
    let mut unknown: Vec<(String, Option<String>)> = env
        .vars()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|n| n.starts_with("KDEDUP_") && !n.starts_with(KAFKA_ENV_PREFIX))
        .filter(|n| !is_service_link(n) && !known.contains(n))
        .map(|n| {
            let closest = known
                .iter()
                .map(|k| (edit_distance(&n, k), k))
                .min()
                .filter(|(d, _)| *d <= 3)
                .map(|(_, k)| k.clone());
            (n, closest)
        })
        .collect();
    unknown.sort();
    unknown
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_links_are_told_from_settings() {
        for link in [
            "KDEDUP_SERVICE_HOST",
            "KDEDUP_SERVICE_PORT",
            "KDEDUP_SERVICE_PORT_METRICS",
            "KDEDUP_PORT",
            "KDEDUP_PORT_9464_TCP",
            "KDEDUP_PORT_9464_TCP_ADDR",
            "KDEDUP_KAFKA_PORT_9092_TCP_PROTO",
            "KDEDUP_KAFKA_SERVICE_HOST",
        ] {
            assert!(is_service_link(link), "{link}");
        }
        for setting in [
            "KDEDUP_GROUP_ID",
            "KDEDUP_KAFKA_SASL_PASSWORD",
            "KDEDUP_KAFKA_SSL_CA_LOCATION",
            "KDEDUP_METRICS_ADDR",
        ] {
            assert!(!is_service_link(setting), "{setting}");
        }
    }

    #[test]
    fn an_unknown_variable_is_named_with_the_closest_setting() {
        let env: BTreeMap<String, String> = [
            ("KDEDUP_GROUPID", "g"),
            ("KDEDUP_GROUP_ID", "g"),
            ("KDEDUP_BATCHSIZE", "5"),
            ("KDEDUP_SOMETHING_ELSE_ENTIRELY", "x"),
            ("KDEDUP_SERVICE_HOST", "10.0.0.1"),
            ("KDEDUP_KAFKA_SASL_USERNAME", "u"),
            ("PATH", "/bin"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            unknown_env_vars(&env),
            vec![
                (
                    "KDEDUP_BATCHSIZE".to_string(),
                    Some("KDEDUP_BATCH_SIZE".to_string())
                ),
                (
                    "KDEDUP_GROUPID".to_string(),
                    Some("KDEDUP_GROUP_ID".to_string())
                ),
                ("KDEDUP_SOMETHING_ELSE_ENTIRELY".to_string(), None),
            ]
        );
        assert!(known_env_vars().contains(&"KDEDUP_SINK_TABLE".to_string()));
    }
}
