//! Trust bundles come from files and from remote bundle endpoints: any bytes must
//! yield a bundle or an error, never a panic, and a parsed bundle must survive
//! its own serialisation unchanged.
#![no_main]

use isthmus_federation::TrustDomain;
use isthmus_federation::trust::TrustBundle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let td: TrustDomain = "fuzz.example".parse().expect("valid trust domain");
    if let Ok(bundle) = TrustBundle::parse(td.clone(), data) {
        assert!(!bundle.authorities.is_empty());
        let json = bundle
            .to_spiffe_json(bundle.sequence.unwrap_or(1), bundle.refresh_hint)
            .expect("a parsed bundle serialises");
        let again = TrustBundle::parse(td.clone(), json.as_bytes()).expect("own output parses");
        assert_eq!(again.authorities, bundle.authorities);
        let pem = TrustBundle::parse(td, bundle.to_pem().as_bytes()).expect("own PEM parses");
        assert_eq!(pem.authorities, bundle.authorities);
    }
});
