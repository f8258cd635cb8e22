//! This gateway's export times, kept in a state file across restarts.
//!
//! The MCS merge lets the oldest export win a conflict. If a restart made
//! every local export new, any peer exporting the same service with a
//! different definition would win it; so the time each service was first
//! exported here is written to a small JSON file (`{"export_times":
//! {"ns/name": unix_millis}}`), replaced atomically on every change.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tracing::warn;

use crate::catalog::ServiceKey;

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct State {
    export_times: BTreeMap<String, u64>,
}

/// The export times in `path`; none when it does not exist yet. A file that
/// cannot be read is logged and treated as empty: losing the times only
/// makes local exports newer, it must not stop the gateway.
pub(crate) fn load_export_times(path: &Path) -> HashMap<ServiceKey, u64> {
    let data = match std::fs::read(path) {
        Ok(data) => data,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "cannot read the federation state file; export times start afresh");
            return HashMap::new();
        }
    };
    match serde_json::from_slice::<State>(&data) {
        Ok(state) => state
            .export_times
            .into_iter()
            .filter_map(|(k, t)| Some((k.parse().ok()?, t)))
            .collect(),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "the federation state file is not valid; export times start afresh");
            HashMap::new()
        }
    }
}

/// Writes `times` to `path` (a temporary file renamed over it, so a crash
/// never leaves half a file). A failure is logged: the gateway goes on.
pub(crate) fn save_export_times(path: &Path, times: &HashMap<ServiceKey, u64>) {
    let state = State {
        export_times: times.iter().map(|(k, t)| (k.to_string(), *t)).collect(),
    };
    let result = serde_json::to_vec_pretty(&state)
        .map_err(std::io::Error::other)
        .and_then(|data| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, data)?;
            std::fs::rename(&tmp, path)
        });
    if let Err(e) = result {
        warn!(file = %path.display(), error = %e, "cannot write the federation state file; export times will not survive a restart");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_times_survive_a_round_trip_and_bad_files_start_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("federation-state.json");
        assert!(load_export_times(&path).is_empty());
        let times: HashMap<ServiceKey, u64> = [("shop/web".parse().unwrap(), 42)].into();
        save_export_times(&path, &times);
        assert_eq!(load_export_times(&path), times);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load_export_times(&path).is_empty());
    }
}
