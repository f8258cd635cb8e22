//! The configuration file is written by people and by tools: any text must
//! give the typed configuration or a list of `path: what is wrong` errors,
//! never a panic, and an accepted configuration must print (`isthmus
//! print-config`) as TOML that parses back to the same configuration.
#![no_main]

use isthmus_gateway::config::parse_with_env;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_with_env(text, "fuzz.toml", std::iter::empty()) {
        Ok(config) => {
            let printed = toml::to_string_pretty(&config).expect("print-config prints it");
            let again = parse_with_env(&printed, "printed.toml", std::iter::empty())
                .unwrap_or_else(|e| panic!("printed configuration refused: {e:?}\n{printed}"));
            assert_eq!(again, config, "printed configuration means the same");
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a refusal says why");
            for e in &errors.0 {
                assert!(!e.to_string().is_empty());
            }
        }
    }
});
