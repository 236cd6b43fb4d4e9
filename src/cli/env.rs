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
