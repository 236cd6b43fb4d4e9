//! `--sink http`: the application's URL and the delivery's limits.

use std::time::Duration;

use super::{parse_duration, required, Findings};
use crate::cli::{ConfigError, RunArgs};
use crate::settings::{HttpSinkSettings, HttpUrl};

impl RunArgs {
    /// `--sink http`: the URL and the delivery's limits.
    pub(super) fn http_sink_settings(&self, f: &mut Findings) -> Option<HttpSinkSettings> {
        let url = f
            .ok(required(
                self.http.http_url.clone(),
                "http_url",
                "http://127.0.0.1:8080/events",
            ))
            .and_then(|u| f.ok(check_http_url(&u)).map(|()| u));
        f.within("http_concurrency", self.http.http_concurrency, 1..=4096, 64);
        f.within(
            "http_max_attempts",
            self.http.http_max_attempts,
            1..=1000,
            12,
        );
        f.rule(self.http.http_max_response_bytes > 1 << 20, || {
            ConfigError::new(
                "http_max_response_bytes",
                format!(
                    "{} is too large to keep with every row",
                    self.http.http_max_response_bytes
                ),
                "choose at most 1048576 (default 4096; 0 keeps no body)",
            )
        });
        let timeout = f.ok(parse_duration(
            "http_timeout",
            &self.http.http_timeout,
            "10s",
        ));
        let backoff = f.ok(parse_duration(
            "http_backoff",
            &self.http.http_backoff,
            "200ms",
        ));
        let max_backoff = f.ok(parse_duration(
            "http_max_backoff",
            &self.http.http_max_backoff,
            "30s",
        ));
        let lease = f.ok(parse_duration("http_lease", &self.http.http_lease, "30s"));
        let conflict_timeout = f.ok(parse_duration(
            "http_conflict_timeout",
            &self.http.http_conflict_timeout,
            "10m",
        ));
        if let Some(t) = timeout {
            f.rule(t < Duration::from_millis(10), || {
                ConfigError::new(
                    "http_timeout",
                    format!("{} is too short for any request", self.http.http_timeout),
                    "choose at least 10ms (default 10s)",
                )
            });
        }
        if let (Some(b), Some(m)) = (backoff, max_backoff) {
            f.rule(b.is_zero() || b > m, || {
                ConfigError::new(
                    "http_backoff",
                    format!(
                        "{} must be more than zero and at most --http-max-backoff ({})",
                        self.http.http_backoff, self.http.http_max_backoff
                    ),
                    "choose e.g. 200ms with --http-max-backoff 30s",
                )
            });
        }
        if let (Some(t), Some(l)) = (timeout, lease) {
            // A request must fit in what is left of a lease between two renewals (a
            // third of it), or it could still be running when another replica may take
            // the event over.
            f.rule(l < t * 3 || l < Duration::from_secs(1), || {
                ConfigError::new(
                    "http_lease",
                    format!(
                        "{} is shorter than 3 x --http-timeout ({}) (or than 1s)",
                        self.http.http_lease, self.http.http_timeout
                    ),
                    "raise --http-lease (KDEDUP_HTTP_LEASE) or lower --http-timeout",
                )
            });
        }
        Some(HttpSinkSettings {
            url: HttpUrl::new(url?),
            concurrency: self.http.http_concurrency,
            max_attempts: self.http.http_max_attempts,
            conflict_timeout: conflict_timeout?,
            timeout: timeout?,
            backoff: backoff?,
            max_backoff: max_backoff?,
            lease: lease?,
            max_response_bytes: self.http.http_max_response_bytes,
        })
    }
}

/// `--http-url`: an absolute `http://` URL the client can call. User information is
/// refused (it would be a password in the configuration and the logs), and so is `https`
/// (the application is on localhost in the pod; kdedup has no TLS client for it).
pub(crate) fn check_http_url(url: &str) -> Result<(), ConfigError> {
    let bad = |problem: String, fix: &str| Err(ConfigError::new("http_url", problem, fix));
    let shown = crate::settings::HttpUrl::new(url.to_string()).to_string();
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return bad(
            format!("{shown:?} is not a URL"),
            "write an absolute URL such as http://127.0.0.1:8080/events",
        );
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return bad(
                format!("{shown:?} is https, which the HTTP sink does not speak"),
                "call the application on localhost over http:// (it runs in the same pod)",
            )
        }
        _ => {
            return bad(
                format!("{shown:?} is not an http:// URL"),
                "write an absolute URL such as http://127.0.0.1:8080/events",
            )
        }
    }
    let Some(authority) = uri.authority() else {
        return bad(
            format!("{shown:?} names no host"),
            "write an absolute URL such as http://127.0.0.1:8080/events",
        );
    };
    if authority.as_str().contains('@') {
        return bad(
            "the URL holds user information (a password would sit in the configuration and the logs)".into(),
            "remove user:password@ from --http-url; authenticate the pod's local traffic another way",
        );
    }
    if uri.host().map_or(true, str::is_empty) {
        return bad(
            format!("{shown:?} names no host"),
            "write an absolute URL such as http://127.0.0.1:8080/events",
        );
    }
    Ok(())
}
