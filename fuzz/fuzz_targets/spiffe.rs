//! SPIFFE IDs: the names in workload certificates, read back into identities by every
//! server-side sidecar. Any URI names at most one identity, and then exactly the URI
//! that identity is written as (two spellings never name one identity); any identity
//! written as a URI reads back as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use toolmesh_proto::workload::{identity_of, spiffe_id};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for domain in ["cluster.local", "td"] {
        if let Some(identity) = identity_of(domain, text) {
            assert_eq!(spiffe_id(domain, &identity), text, "{identity:?}");
        }
        let written = spiffe_id(domain, text);
        assert_eq!(identity_of(domain, &written).as_deref(), Some(text), "{written}");
        assert!(!written[9 + domain.len()..].contains(['?', '#', ' ']), "{written}");
    }
});
