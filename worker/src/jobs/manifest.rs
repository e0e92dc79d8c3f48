//! Reading a backup's manifest for restore and verify.

use koan_protocol::archive::{FORMAT_VERSION, Manifest};
use serde::Deserialize;

use super::Failure;
use crate::storage::Storage;

/// Code of a manifest written in an archive format this worker cannot read.
pub(crate) const UNSUPPORTED_FORMAT: &str = "unsupported_format";

/// Reads and parses the manifest at `path`. Failures name the path: a
/// missing manifest (`manifest_missing`, the backup is incomplete or
/// gone), one that is not a manifest (`manifest_unreadable`), another format
/// version ([`UNSUPPORTED_FORMAT`]); storage errors keep their retry verdict.
pub(crate) async fn read_manifest(storage: &Storage, path: &str) -> Result<Manifest, Failure> {
    let bytes = storage.get(path).await.map_err(|error| {
        if error.is_not_found() {
            Failure::permanent(
                "manifest_missing",
                format!(
                    "manifest '{path}' is not in storage: the backup is incomplete or was deleted"
                ),
            )
        } else {
            Failure::worker(&error)
        }
    })?;
    #[derive(Deserialize)]
    struct FormatOnly {
        format_version: u32,
    }
    let unreadable = |error: serde_json::Error| {
        Failure::permanent(
            "manifest_unreadable",
            format!("manifest '{path}' cannot be read: {error}"),
        )
    };
    let format: FormatOnly = serde_json::from_slice(&bytes).map_err(unreadable)?;
    if format.format_version != FORMAT_VERSION {
        return Err(Failure::permanent(
            UNSUPPORTED_FORMAT,
            format!(
                "manifest '{path}' has archive format version {}; this worker reads version {FORMAT_VERSION}",
                format.format_version
            ),
        ));
    }
    serde_json::from_slice(&bytes).map_err(unreadable)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn names_the_path_of_a_bad_manifest() {
        let storage = Storage::from_store(Arc::new(object_store::memory::InMemory::new()));
        let missing = read_manifest(&storage, "b/s/p/x/manifest.json")
            .await
            .unwrap_err();
        assert_eq!(missing.code, "manifest_missing");
        assert!(!missing.retryable);
        assert!(
            missing.error.contains("b/s/p/x/manifest.json"),
            "{missing:?}"
        );

        storage.put("m1.json", b"{nope".to_vec()).await.unwrap();
        let garbage = read_manifest(&storage, "m1.json").await.unwrap_err();
        assert_eq!(garbage.code, "manifest_unreadable");
        assert!(garbage.error.contains("m1.json"), "{garbage:?}");

        storage
            .put(
                "m2.json",
                br#"{"format_version": 2, "whatever": true}"#.to_vec(),
            )
            .await
            .unwrap();
        let future = read_manifest(&storage, "m2.json").await.unwrap_err();
        assert_eq!(future.code, UNSUPPORTED_FORMAT);
        assert!(future.error.contains("version 2"), "{future:?}");

        storage
            .put("m3.json", br#"{"format_version": 1}"#.to_vec())
            .await
            .unwrap();
        let incomplete = read_manifest(&storage, "m3.json").await.unwrap_err();
        assert_eq!(incomplete.code, "manifest_unreadable");
        assert!(incomplete.error.contains("missing field"), "{incomplete:?}");
    }
}
