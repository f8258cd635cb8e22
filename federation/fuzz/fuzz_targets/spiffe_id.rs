//! SPIFFE IDs arrive in peer certificates and configuration: parsing never
//! panics, and an accepted ID prints back exactly as given.
#![no_main]

use isthmus_federation::SpiffeId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(id) = s.parse::<SpiffeId>()
    {
        assert_eq!(id.to_string(), s);
        assert_eq!(format!("spiffe://{}{}", id.trust_domain_str(), id.path()), s);
    }
});
