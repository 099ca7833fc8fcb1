// ese patch: a durable object store for the single-node broker (`file://DIR`).
//
// Objects live in memory (object_store's `InMemory`, as `memory://`), and
// every change is appended to one journal file (`DIR/broker.journal`)
// *before* it is applied and answered: a put or delete that returned Ok is
// in the file. Opening replays the journal into memory, drops a torn or
// corrupt tail (a write the crash cut short was never answered), and writes
// the live objects anew when the journal has grown past twice their size
// (also while running, without holding writes up: see `rewrite`).
//
// A write reaches the operating system before it is answered, so it
// survives the process being killed (kill -9) and a clean restart of the
// machine; the file is flushed to the disk (`fdatasync`) every second and at
// drop, so a power cut can take the last second, as with Apache Kafka's
// defaults (which leave flushing to the operating system) and SQLite's
// `synchronous = normal`.
//
// One process owns a journal: the file is locked while open.

use std::{
    fmt,
    fs::{File, OpenOptions},
    io::{BufReader, ErrorKind, Read, Seek, SeekFrom, Write},
    ops::Range,
    path::{Path as FsPath, PathBuf},
    sync::{Arc, Weak},
    thread,
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use object_store::{
    CopyMode, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    memory::InMemory, path::Path,
};
use tokio::sync::Mutex;
use tracing::{info, warn};

const STORE: &str = "Journal";
/// The journal's file name in its folder.
pub const FILE: &str = "broker.journal";
const PUT: u8 = 1;
const DELETE: u8 = 2;
/// The journal is rewritten when it exceeds twice the live objects and this.
pub const COMPACT_FLOOR: u64 = 64 << 20;
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Objects in memory, every change journaled first (see the module's text).
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    memory: InMemory,
    dir: PathBuf,
    log: Mutex<Log>,
}

struct Log {
    file: Arc<File>,
    /// Bytes in the file, all of them whole frames.
    len: u64,
    /// Bytes of the objects held: the journal is rewritten when it has
    /// grown past twice this (and [`COMPACT_FLOOR`]).
    live: u64,
    /// After a rewrite failed: none before the journal reaches this.
    not_before: u64,
    /// A write failed part way and could not be undone: refuse the rest.
    broken: Option<String>,
    /// While a rewrite runs: every frame appended since it took the
    /// objects, for the new journal too.
    pending: Option<Vec<u8>>,
}

fn generic(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: source.into(),
    }
}

/// `len u32 | op u8 | path_len u16 | path | payload | crc32 u32` (little
/// endian; `len` counts op to payload, the CRC covers the same bytes).
fn frame(op: u8, location: &Path, payload: &[u8]) -> object_store::Result<Vec<u8>> {
    let path = location.as_ref().as_bytes();
    let path_len = u16::try_from(path.len()).map_err(|_| generic("path longer than 64 KiB"))?;
    let len = u32::try_from(1 + 2 + path.len() + payload.len())
        .map_err(|_| generic("object larger than 4 GiB"))?;
    let mut out = Vec::with_capacity(len as usize + 8);
    out.extend_from_slice(&len.to_le_bytes());
    out.push(op);
    out.extend_from_slice(&path_len.to_le_bytes());
    out.extend_from_slice(path);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[4..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// One frame read back: `None` at the end or at a torn or corrupt tail.
fn read_frame(reader: &mut impl Read) -> std::io::Result<Option<(u8, Path, Bytes)>> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len < 3 {
        return Ok(None);
    }
    let mut body = vec![0u8; len + 4];
    match reader.read_exact(&mut body) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let crc = u32::from_le_bytes([body[len], body[len + 1], body[len + 2], body[len + 3]]);
    if crc32fast::hash(&body[..len]) != crc {
        return Ok(None);
    }
    let op = body[0];
    let path_len = u16::from_le_bytes([body[1], body[2]]) as usize;
    if 3 + path_len > len || !(op == PUT || op == DELETE) {
        return Ok(None);
    }
    let Ok(path) = std::str::from_utf8(&body[3..3 + path_len]) else {
        return Ok(None);
    };
    let path = Path::from(path);
    body.truncate(len);
    let payload = Bytes::from(body).slice(3 + path_len..);
    Ok(Some((op, path, payload)))
}

impl Journal {
    /// Opens (creating when absent) the journal in `dir` and loads it.
    pub async fn open(dir: &FsPath) -> object_store::Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| generic(format!("{}: cannot create it: {e}", dir.display())))?;
        let path = dir.join(FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| generic(format!("{}: {e}", path.display())))?;
        // The lock of a journal just closed in this process can outlive it
        // by the length of a flush (the flushing thread holds the file), so
        // a busy lock is retried for a moment before it is refused.
        let mut tries = 0;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if tries < 40 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(generic(format!(
                        "{}: in use by another process; one broker per data folder",
                        path.display()
                    )));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(generic(format!("{}: cannot lock it: {e}", path.display())));
                }
            }
        }

        let memory = InMemory::new();
        let total = file
            .metadata()
            .map_err(|e| generic(format!("{}: {e}", path.display())))?
            .len();
        let (mut frames, mut good) = (0u64, 0u64);
        {
            let mut reader = BufReader::with_capacity(1 << 20, &file);
            while let Some((op, location, payload)) =
                read_frame(&mut reader).map_err(|e| generic(format!("{}: {e}", path.display())))?
            {
                match op {
                    PUT => _ = memory.put(&location, payload.clone().into()).await?,
                    _ => match memory.delete(&location).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    },
                }
                frames += 1;
                let before = good;
                good += 4 + 4 + 3 + location.as_ref().len() as u64 + payload.len() as u64;
                // A long load says how far it is, every 256 MiB.
                if good >> 28 != before >> 28 {
                    info!(
                        journal = %path.display(),
                        loaded_mib = good >> 20,
                        of_mib = total >> 20,
                        "journal: loading"
                    );
                }
            }
        }
        if good < total {
            warn!(
                journal = %path.display(),
                dropped_bytes = total - good,
                "journal: dropping a torn or corrupt tail (a write cut short, never answered)"
            );
            file.set_len(good)
                .and_then(|()| file.sync_all())
                .map_err(|e| generic(format!("{}: {e}", path.display())))?;
        }
        _ = file
            .seek(SeekFrom::Start(good))
            .map_err(|e| generic(format!("{}: {e}", path.display())))?;

        let journal = Self {
            inner: Arc::new(Inner {
                memory,
                dir: dir.to_path_buf(),
                log: Mutex::new(Log {
                    file: Arc::new(file),
                    len: good,
                    live: 0,
                    not_before: 0,
                    broken: None,
                    pending: None,
                }),
            }),
        };
        let live = journal.inner.live_bytes().await?;
        journal.inner.log.lock().await.live = live;
        journal.inner.rewrite().await?;
        info!(journal = %path.display(), frames, bytes = good, live, "journal: loaded");
        journal.spawn_sync();
        Ok(journal)
    }

    /// Flushes the journal to the disk every [`SYNC_EVERY`] until dropped.
    fn spawn_sync(&self) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        _ = thread::Builder::new()
            .name("journal-sync".into())
            .spawn(move || {
                loop {
                    thread::sleep(SYNC_EVERY);
                    let Some(inner) = weak.upgrade() else { break };
                    let file = inner.log.blocking_lock().file.clone();
                    drop(inner);
                    if let Err(e) = file.sync_data() {
                        warn!(error = %e, "journal: flush to disk failed");
                    }
                }
            });
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(log) = self.log.try_lock() {
            _ = log.file.sync_data();
        }
    }
}

impl Inner {
    /// Appends one frame, leaving the file whole if the write fails.
    fn append(&self, log: &mut Log, frame: &[u8]) -> object_store::Result<()> {
        if let Some(broken) = &log.broken {
            return Err(generic(format!("journal unusable: {broken}")));
        }
        if let Err(e) = (&*log.file).write_all(frame) {
            let undo = log
                .file
                .set_len(log.len)
                .and_then(|()| (&*log.file).seek(SeekFrom::Start(log.len)).map(|_| ()));
            if let Err(undo) = undo {
                log.broken = Some(format!(
                    "write failed ({e}) and could not be undone ({undo})"
                ));
            }
            return Err(generic(format!("journal write: {e}")));
        }
        log.len += frame.len() as u64;
        if let Some(pending) = &mut log.pending {
            pending.extend_from_slice(frame);
        }
        Ok(())
    }

    async fn live_bytes(&self) -> object_store::Result<u64> {
        self.memory
            .list(None)
            .try_fold(0u64, |n, meta| async move { Ok(n + meta.size) })
            .await
    }

    /// Writes the live objects to a new journal and puts it in place of the
    /// old one (written, flushed, renamed: a crash leaves one or the other),
    /// when one is due (see [`Inner::due`]).
    /// Writes go on meanwhile: the lock is held to take the objects (their
    /// bytes are shared, not copied) and at the end, to add what was written
    /// since and swap the files.
    async fn rewrite(&self) -> object_store::Result<()> {
        let objects = {
            let mut log = self.log.lock().await;
            if !Self::due(&log) {
                return Ok(());
            }
            let mut objects = vec![];
            let mut listed = self.memory.list(None);
            while let Some(meta) = listed.next().await.transpose()? {
                let bytes = self.memory.get(&meta.location).await?.bytes().await?;
                objects.push((meta.location, bytes));
            }
            log.pending = Some(vec![]);
            objects
        };
        let tmp = self.dir.join(format!("{FILE}.new"));
        let result = self.rewrite_from(objects, &tmp).await;
        if result.is_err() {
            _ = std::fs::remove_file(&tmp);
            let mut log = self.log.lock().await;
            log.pending = None;
            log.not_before = log.len + COMPACT_FLOOR;
        }
        result
    }

    async fn rewrite_from(
        &self,
        objects: Vec<(Path, Bytes)>,
        tmp: &FsPath,
    ) -> object_store::Result<()> {
        let io = |e: std::io::Error| generic(format!("{}: {e}", tmp.display()));
        let (file, written) = {
            let tmp = tmp.to_path_buf();
            tokio::task::spawn_blocking(move || -> object_store::Result<(File, u64)> {
                let io = |e: std::io::Error| generic(format!("{}: {e}", tmp.display()));
                let file = File::create(&tmp).map_err(io)?;
                file.try_lock().map_err(|e| io(e.into()))?;
                let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
                let mut written = 0u64;
                for (location, bytes) in &objects {
                    let frame = frame(PUT, location, bytes)?;
                    out.write_all(&frame).map_err(io)?;
                    written += frame.len() as u64;
                }
                let file = out.into_inner().map_err(|e| io(e.into_error()))?;
                file.sync_data().map_err(io)?;
                Ok((file, written))
            })
            .await
            .map_err(|e| generic(format!("journal rewrite: {e}")))??
        };
        let path = self.dir.join(FILE);
        let mut log = self.log.lock().await;
        let pending = log.pending.take().unwrap_or_default();
        (&file).write_all(&pending).map_err(io)?;
        file.sync_data().map_err(io)?;
        std::fs::rename(tmp, &path).map_err(io)?;
        if let Ok(dir) = File::open(&self.dir) {
            _ = dir.sync_all();
        }
        let len = written + pending.len() as u64;
        info!(journal = %path.display(), before = log.len, after = len, "journal: rewritten");
        log.file = Arc::new(file);
        log.len = len;
        Ok(())
    }

    /// After a write, with the lock let go: a rewrite if one is due.
    async fn rewrite_if_due(&self) {
        if let Err(e) = self.rewrite().await {
            warn!(error = %e, "journal: rewrite failed; the old journal stays in use");
        }
    }

    /// Whether a rewrite is due (checked under the lock): none running and
    /// the journal more than twice the objects held, past the floor.
    fn due(log: &Log) -> bool {
        log.pending.is_none() && log.len > log.not_before && log.len > 2 * log.live + COMPACT_FLOOR
    }

    /// The object at `location`, if any.
    async fn current(&self, location: &Path) -> object_store::Result<Option<ObjectMeta>> {
        match self.memory.head(location).await {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn delete_one(&self, location: &Path) -> object_store::Result<()> {
        let mut log = self.log.lock().await;
        if let Some(meta) = self.current(location).await? {
            self.append(&mut log, &frame(DELETE, location, &[])?)?;
            self.memory.delete(location).await?;
            log.live = log.live.saturating_sub(meta.size);
            if Self::due(&log) {
                drop(log);
                self.rewrite_if_due().await;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Journal({})", self.inner.dir.join(FILE).display())
    }
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[async_trait]
impl ObjectStore for Journal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let inner = &self.inner;
        let mut log = inner.log.lock().await;
        // The conditions are checked here, before the journal is written;
        // every write holds the lock, so they still hold when applied.
        let current = inner.current(location).await?;
        match &opts.mode {
            PutMode::Overwrite => {}
            PutMode::Create => {
                if current.is_some() {
                    return Err(object_store::Error::AlreadyExists {
                        path: location.to_string(),
                        source: "object exists".into(),
                    });
                }
            }
            PutMode::Update(v) => {
                let e_tag = current.as_ref().and_then(|meta| meta.e_tag.clone());
                if e_tag.is_none() || e_tag != v.e_tag {
                    return Err(object_store::Error::Precondition {
                        path: location.to_string(),
                        source: format!("{e_tag:?} does not match {:?}", v.e_tag).into(),
                    });
                }
            }
        }
        let bytes = Bytes::from(payload);
        let size = bytes.len() as u64;
        inner.append(&mut log, &frame(PUT, location, &bytes)?)?;
        let result = inner.memory.put_opts(location, bytes.into(), opts).await?;
        log.live = log.live.saturating_sub(current.map_or(0, |meta| meta.size)) + size;
        if Inner::due(&log) {
            drop(log);
            inner.rewrite_if_due().await;
        }
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(object_store::Error::NotImplemented {
            operation: "put_multipart_opts".into(),
            implementer: STORE.into(),
        })
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.memory.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner.memory.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let inner = self.inner.clone();
        locations
            .then(move |location| {
                let inner = inner.clone();
                async move {
                    let location = location?;
                    inner.delete_one(&location).await?;
                    Ok(location)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.memory.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.memory.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.memory.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let inner = &self.inner;
        let mut log = inner.log.lock().await;
        let current = inner.current(to).await?;
        if matches!(options.mode, CopyMode::Create) && current.is_some() {
            return Err(object_store::Error::AlreadyExists {
                path: to.to_string(),
                source: "object exists".into(),
            });
        }
        let bytes = inner.memory.get(from).await?.bytes().await?;
        inner.append(&mut log, &frame(PUT, to, &bytes)?)?;
        inner.memory.copy_opts(from, to, options).await?;
        log.live =
            log.live.saturating_sub(current.map_or(0, |meta| meta.size)) + bytes.len() as u64;
        if Inner::due(&log) {
            drop(log);
            inner.rewrite_if_due().await;
        }
        Ok(())
    }
}
