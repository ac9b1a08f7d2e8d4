//! The config: TOML plus environment (`Config::from_toml_and_env`, which validates), and
//! upstream URLs (`UpstreamUrl::parse`).
//!
//! Input: TOML text, then optionally a NUL and `NAME=value` lines for the environment.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use pgnear::config::{mask_url, Config, HumanDuration};
use pgnear::upstream_url::UpstreamUrl;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, env_text) = text.split_once('\0').unwrap_or((text, ""));
    let env: BTreeMap<String, String> = env_text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Ok(config) = Config::from_toml_and_env(toml, "fuzz", &env) {
        assert!(config.validate().is_ok());
        // What `validate` promises the rest of pgnear.
        let primary = config.primary();
        let _ = config.auth_method();
        let _ = config.listens_on_loopback();
        let _ = config.nameserver();
        let _ = config.render_masked();
        let _ = primary;
        if !config.upstream.replica_url.is_empty() {
            UpstreamUrl::parse(&config.upstream.replica_url).expect("validated replica URL");
        }
    }
    // Every line as an upstream URL: what parses prints back to a URL that parses the same.
    for line in text.lines() {
        let _ = HumanDuration::parse(line);
        let _ = mask_url(line);
        if let Ok(u) = UpstreamUrl::parse(line) {
            let again = u.to_url_with_password();
            assert_eq!(
                UpstreamUrl::parse(&again).as_ref(),
                Ok(&u),
                "{line:?} -> {again:?}"
            );
        }
    }
});
