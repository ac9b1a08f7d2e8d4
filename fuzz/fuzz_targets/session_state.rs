//! The startup parameters a session replays on every server (`SessionState::from_startup`,
//! with `options` parsing).
//!
//! Input: NUL-separated name, value, name, value, ...
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgnear::session::state::SessionState;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parts: Vec<&str> = text.split('\0').collect();
    let params: Vec<(String, String)> = parts
        .chunks_exact(2)
        .map(|kv| (kv[0].to_string(), kv[1].to_string()))
        .collect();
    if let Ok(state) = SessionState::from_startup(&params) {
        assert_eq!(
            SessionState::from_startup(&params).map(|s| s.applied()),
            Ok(state.applied())
        );
        for (name, sql) in state.applied() {
            let name = name.expect("a startup setting has a name");
            assert!(sql.starts_with("SET "));
            assert_eq!(state.setting_sql(&name), Some(sql.as_str()));
        }
    }
});
