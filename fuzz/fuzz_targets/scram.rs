//! The server side of SCRAM-SHA-256: parsing the client-first (SASLInitialResponse) and
//! client-final (SASLResponse) messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgnear::auth::{parse_client_final, parse_client_first};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = parse_client_first(data) {
        // The gs2 header and the bare message are the message, split.
        let (_, used) = pgnear::protocol::cstr(data).unwrap();
        let message = std::str::from_utf8(&data[used + 4..]).unwrap();
        assert_eq!(format!("{}{}", f.gs2_header, f.bare), message);
        assert!(f.gs2_header.starts_with("n,") || f.gs2_header.starts_with("y,"));
        assert!(f.gs2_header.ends_with(','));
        assert!(!f.nonce.is_empty() && !f.nonce.contains(','));
    }
    if let Ok(f) = parse_client_final(data) {
        let text = std::str::from_utf8(data).unwrap();
        assert_eq!(format!("{},p={}", f.without_proof, f.proof), text);
        assert!(!f.proof.contains(",p="));
    }
});
