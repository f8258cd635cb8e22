//! Watching a file for changes.
//!
//! The file's *directory* is watched, not the file: editors save by writing a
//! new file and renaming it over the old one, and Kubernetes swaps a
//! ConfigMap's files by replacing a symlink, and neither is an event on the
//! old file. Any event in the directory wakes the watcher; a burst of them (a
//! save is several) is coalesced by waiting for the directory to be quiet for
//! the debounce interval. Whoever reads the file then compares its content
//! with what it read last, so events about other files cost one read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// The largest file a source reads: a file of services is small, and a
/// runaway one must not exhaust memory.
pub const MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;

/// Watches one file's directory; see the module docs.
pub struct FileWatcher {
    events: mpsc::UnboundedReceiver<()>,
    debounce: Duration,
    // Dropping it stops the watch.
    _watcher: RecommendedWatcher,
}

impl FileWatcher {
    /// Starts watching the directory that holds `path`.
    pub fn new(path: &Path, debounce: Duration) -> Result<Self, notify::Error> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Reads (including this source's own) are not changes.
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    let _ = tx.send(());
                }
            })?;
        watcher.watch(&directory_of(path), RecursiveMode::NonRecursive)?;
        Ok(Self {
            events,
            debounce,
            _watcher: watcher,
        })
    }

    /// Waits for a change, then for the directory to be quiet for the
    /// debounce interval. Never returns if the watch ended.
    pub async fn changed(&mut self) {
        if self.events.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
        loop {
            match tokio::time::timeout(self.debounce, self.events.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    }
}

/// The directory holding `path` (`.` for a bare file name).
pub fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Reads `path`, refusing files over [`MAX_FILE_SIZE`].
pub fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("is larger than {MAX_FILE_SIZE} bytes"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rename_over_the_file_is_seen_once_after_the_burst() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.toml");
        std::fs::write(&path, "a").unwrap();
        let mut watcher = FileWatcher::new(&path, Duration::from_millis(100)).unwrap();
        // An editor's atomic save: write elsewhere, rename over.
        let tmp = dir.path().join(".services.toml.swp");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(Duration::from_secs(5), watcher.changed())
            .await
            .expect("the rename is seen");
        assert_eq!(read_bounded(&path).unwrap(), b"b");
        // The burst was drained: nothing more until the next change.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), watcher.changed())
                .await
                .is_err()
        );
        std::fs::write(&path, "c").unwrap();
        tokio::time::timeout(Duration::from_secs(5), watcher.changed())
            .await
            .expect("the write is seen");
    }

    #[test]
    fn oversized_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(MAX_FILE_SIZE + 1)
            .unwrap();
        assert!(read_bounded(&path).is_err());
        assert_eq!(directory_of(Path::new("x.toml")), PathBuf::from("."));
    }
}
