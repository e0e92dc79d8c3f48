//! Archive storage: a thin wrapper over `object_store`.
//!
//! Every path handed in comes from `koan_protocol::archive` (validated names
//! only); this module parses it once more into an `object_store` path so an
//! empty, `.` or `..` segment can never reach the store. The local backend
//! fsyncs files and directories before a write returns, so "the put returned"
//! means "the bytes are durable", which is what the ack-after-durable rule needs.

use std::path::PathBuf;
use std::sync::Arc;

use futures::TryStreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use crate::error::WorkerError;

/// Size of the pieces a multipart upload is sent in. The local store writes
/// each piece at its offset as it arrives, so pieces are small: compressed
/// bytes never wait in memory for a large piece to fill (a part's compressed
/// size is usually below a few MiB). A store with a minimum part size (S3:
/// 5 MiB) would need its own.
pub const UPLOAD_PIECE_BYTES: usize = 256 * 1024;

/// The bytes of an object, piece by piece.
pub type ByteStream = BoxStream<'static, object_store::Result<bytes::Bytes>>;

/// Where archives live, parsed from `storage_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRoot {
    /// The local directory holding every bucket.
    pub directory: PathBuf,
}

impl StorageRoot {
    /// Parses `file:///absolute/path` or a plain (absolute or relative) path.
    /// Any other scheme is refused with "unsupported storage url scheme".
    pub fn parse(storage_url: &str) -> Result<Self, WorkerError> {
        let bad = |reason: &str| WorkerError::Config {
            field: "storage_url",
            reason: reason.to_string(),
        };
        let trimmed = storage_url.trim();
        if trimmed.is_empty() {
            return Err(bad("must name a directory or a file:/// url"));
        }
        let Some(scheme_end) = trimmed.find("://") else {
            return Ok(Self {
                directory: PathBuf::from(trimmed),
            });
        };
        let scheme = &trimmed[..scheme_end];
        if !scheme.eq_ignore_ascii_case("file") {
            return Err(WorkerError::UnsupportedStorage {
                scheme: scheme
                    .chars()
                    .take(32)
                    .collect::<String>()
                    .escape_default()
                    .to_string(),
            });
        }
        let url =
            url::Url::parse(trimmed).map_err(|error| bad(&format!("invalid url: {error}")))?;
        if url.host_str().is_some_and(|host| host != "localhost") {
            return Err(bad("a file url names no host (file:///absolute/path)"));
        }
        let directory = url
            .to_file_path()
            .map_err(|()| bad("a file url needs an absolute path (file:///absolute/path)"))?;
        Ok(Self { directory })
    }
}

/// Archive storage shared by every job of a worker.
#[derive(Debug, Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
}

impl Storage {
    /// Opens the storage named by `storage_url`, creating the directory if needed.
    pub fn open(storage_url: &str) -> Result<Self, WorkerError> {
        let root = StorageRoot::parse(storage_url)?;
        std::fs::create_dir_all(&root.directory).map_err(|error| WorkerError::Config {
            field: "storage_url",
            reason: format!("cannot create {}: {error}", root.directory.display()),
        })?;
        let store = LocalFileSystem::new_with_prefix(&root.directory)
            .map_err(WorkerError::storage(
                "open",
                root.directory.display().to_string(),
            ))?
            .with_fsync(true)
            .with_automatic_cleanup(true);
        Ok(Self::from_store(Arc::new(store)))
    }

    /// Wraps any object store (tests use an in-memory one).
    pub fn from_store(store: Arc<dyn ObjectStore>) -> Self {
        Self { store }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Parses an archive path into a store location, refusing empty, `.` and `..` segments.
    pub fn location(path: &str) -> Result<Path, WorkerError> {
        Path::parse(path).map_err(|source| WorkerError::Storage {
            operation: "parse path",
            path: path.escape_default().take(300).collect(),
            source: object_store::Error::InvalidPath { source },
        })
    }

    /// Writes a whole object atomically.
    pub async fn put(&self, path: &str, bytes: Vec<u8>) -> Result<(), WorkerError> {
        let location = Self::location(path)?;
        self.store
            .put(&location, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(WorkerError::storage("put", path))
    }

    /// Starts a multipart upload whose object appears only when it is
    /// finished; it is sent in [`UPLOAD_PIECE_BYTES`] pieces.
    pub async fn multipart(&self, path: &str) -> Result<WriteMultipart, WorkerError> {
        let location = Self::location(path)?;
        let upload = self
            .store
            .put_multipart(&location)
            .await
            .map_err(WorkerError::storage("multipart upload", path))?;
        Ok(WriteMultipart::new_with_chunk_size(
            upload,
            UPLOAD_PIECE_BYTES,
        ))
    }

    /// Every object under `prefix` (recursively).
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, WorkerError> {
        let location = Self::location(prefix)?;
        self.store
            .list(Some(&location))
            .try_collect()
            .await
            .map_err(WorkerError::storage("list", prefix))
    }

    /// Deletes one object; a missing object is not an error.
    pub async fn delete(&self, path: &str) -> Result<(), WorkerError> {
        let location = Self::location(path)?;
        match self.store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(WorkerError::storage("delete", path)(source)),
        }
    }

    /// Opens an object for streaming: its size and its bytes, in pieces as
    /// the backend delivers them (the local backend reads 8 KiB at a time).
    pub async fn get_stream(&self, path: &str) -> Result<(u64, ByteStream), WorkerError> {
        let location = Self::location(path)?;
        let fetched = self
            .store
            .get(&location)
            .await
            .map_err(WorkerError::storage("get", path))?;
        Ok((fetched.meta.size, fetched.into_stream()))
    }

    /// Reads a whole object.
    pub async fn get(&self, path: &str) -> Result<bytes::Bytes, WorkerError> {
        let location = Self::location(path)?;
        let fetched = self
            .store
            .get(&location)
            .await
            .map_err(WorkerError::storage("get", path))?;
        fetched
            .bytes()
            .await
            .map_err(WorkerError::storage("get", path))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_storage_urls() {
        assert_eq!(
            StorageRoot::parse("file:///var/koan").unwrap().directory,
            PathBuf::from("/var/koan")
        );
        assert_eq!(
            StorageRoot::parse("file://localhost/var/koan")
                .unwrap()
                .directory,
            PathBuf::from("/var/koan")
        );
        assert_eq!(
            StorageRoot::parse("./koan-archives").unwrap().directory,
            PathBuf::from("./koan-archives")
        );
        assert_eq!(
            StorageRoot::parse("/data/a:b").unwrap().directory,
            PathBuf::from("/data/a:b")
        );
        for (url, expected) in [
            ("s3://bucket/prefix", "unsupported storage url scheme 's3'"),
            ("https://host/x", "unsupported storage url scheme 'https'"),
            ("file://otherhost/x", "names no host"),
            ("", "storage_url"),
        ] {
            let error = StorageRoot::parse(url).unwrap_err().to_string();
            assert!(error.contains(expected), "{url}: {error}");
        }
    }

    #[test]
    fn refuses_escaping_paths() {
        assert!(Storage::location("a/../b").is_err());
        assert!(Storage::location("a//b").is_err());
        Storage::location("orders/tenant-a/orders:daily/x/manifest.json").unwrap();
    }

    #[tokio::test]
    async fn writes_lists_and_deletes_in_a_directory() {
        let directory = std::env::temp_dir().join(format!("koan-storage-{}", uuid::Uuid::new_v4()));
        let url = format!("file://{}/nested", directory.display());
        let storage = Storage::open(&url).unwrap();
        storage.put("b/x/one.json", b"{}".to_vec()).await.unwrap();
        storage.put("b/x/two.json", b"[]".to_vec()).await.unwrap();
        let mut listed: Vec<String> = storage
            .list("b/x")
            .await
            .unwrap()
            .into_iter()
            .map(|meta| meta.location.to_string())
            .collect();
        listed.sort();
        assert_eq!(listed, vec!["b/x/one.json", "b/x/two.json"]);
        assert_eq!(storage.get("b/x/two.json").await.unwrap().as_ref(), b"[]");
        let (size, stream) = storage.get_stream("b/x/two.json").await.unwrap();
        let pieces: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
        assert_eq!((size, pieces.concat()), (2, b"[]".to_vec()));
        let missing = storage.get_stream("b/x/none").await.map(|(size, _)| size);
        assert!(missing.unwrap_err().is_not_found());
        storage.delete("b/x/one.json").await.unwrap();
        storage.delete("b/x/one.json").await.unwrap();
        assert_eq!(storage.list("b/x").await.unwrap().len(), 1);
        assert!(storage.list("nothing/here").await.unwrap().is_empty());
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
