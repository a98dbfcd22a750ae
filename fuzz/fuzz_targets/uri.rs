//! Resource URIs: any string through the sidecar's reading of a URI. What it accepts,
//! a WHATWG parser (what the official SDKs' servers use) reads the same way: parsing
//! the accepted URI and asking again gives the same meaning, and accepting never
//! panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use toolmesh_sidecar::uri;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(meaning) = uri::canonical(text) else {
        return;
    };
    // Accepted: the WHATWG reading of what was sent, spelled out, means the same.
    let parsed = url::Url::parse(text).expect("accepted URIs parse");
    let again = uri::canonical(parsed.as_str())
        .unwrap_or_else(|e| panic!("{text:?} accepted, its WHATWG form {parsed} refused: {e}"));
    assert!(
        again == meaning || again.strip_suffix('/') == Some(&*meaning),
        "{text:?} judged as {meaning:?}, its WHATWG form {parsed} as {again:?}"
    );
    // Nothing a WHATWG reader removes survives into an accepted URI (`..` as a host,
    // `docs://../x`, is a host for every reader, not a dot segment).
    assert!(!text.contains(['\t', '\n', '\r']), "{text:?}");
});
