//! Large answers sent from sealed memory files with `sendfile(2)`, so that
//! the kernel does not copy them into every socket that asks.
//!
//! Why: with 64 clients asking for half of a 1,000-device list, 42% of
//! vfiod's CPU was `_copy_from_iter`: every `writev` copied the cached
//! body into the socket's buffers, hundreds of KB per answer. `sendfile`
//! from a memory file instead hands the socket references to the file's
//! pages (what nginx does with its files), and the only copy left is the
//! client's read.
//!
//! How: [`seal`] moves a body into a memfd, seals it against any change
//! (write, grow, shrink, and further seals), and maps it read-only; the
//! `Bytes` it returns point into that mapping, so everything else (device
//! spans, filtered lists, tests) reads them as before. A process-wide
//! table knows each live mapping's address range and file. A connection's
//! writer ([`ZeroCopy`]) looks up each slice hyper asks it to write: one
//! that lies in a mapping goes out with `sendfile` from that file at the
//! same offset, everything else with `writev` as before.
//!
//! Why this is safe: the socket holds references to the file's pages until
//! the client has read them, and the seals guarantee that nobody (vfiod
//! included) can change those pages, so the client reads exactly the
//! bytes that were sealed, even after the body was dropped and its file
//! closed. A slice hyper passes borrows from a `Bytes` that hyper holds, so
//! its mapping (and file) stay alive while it is looked up and sent.
//!
//! Where memfds or `sendfile` are refused (an older kernel, a seccomp
//! filter), bodies stay plain heap `Bytes` and are written as before.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::RwLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Bodies smaller than this stay on the heap: below it, setting up a
/// memory file and a `sendfile` costs more than the copy it saves.
pub const ZERO_COPY_MIN: usize = 64 * 1024;

/// Live mappings: start address → (end address, the file's descriptor).
static MAPPINGS: RwLock<BTreeMap<usize, (usize, RawFd)>> = RwLock::new(BTreeMap::new());
/// How many mappings are live: writers skip the table while it is zero.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Set once sealing or `sendfile` was refused: from then on, bodies stay
/// on the heap (the refusal would not change).
static REFUSED: AtomicBool = AtomicBool::new(false);

/// `body` as `Bytes` backed by a sealed memory file, or as plain `Bytes`
/// if it is small or memory files cannot be had.
pub fn seal(body: Vec<u8>) -> Bytes {
    if body.len() < ZERO_COPY_MIN || REFUSED.load(Ordering::Relaxed) {
        return Bytes::from(body);
    }
    match Sealed::new(&body) {
        Ok(sealed) => Bytes::from_owner(sealed),
        Err(e) => {
            if !REFUSED.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot seal an answer into a memory file ({e}); large answers are copied into each socket from now on");
            }
            Bytes::from(body)
        }
    }
}

/// A read-only shared mapping of a sealed memfd, listed in [`MAPPINGS`]
/// for as long as it lives.
struct Sealed {
    start: *const u8,
    len: usize,
    file: OwnedFd,
}

// The mapping is read-only and nothing can change the file under it (its
// seals), so it may be read from any thread.
unsafe impl Send for Sealed {}
unsafe impl Sync for Sealed {}

impl Sealed {
    fn new(body: &[u8]) -> io::Result<Sealed> {
        use rustix::fs::{MemfdFlags, SealFlags};
        let file = rustix::fs::memfd_create(
            "vfiod-answer",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        let mut written = 0;
        while written < body.len() {
            match rustix::io::write(&file, &body[written..])? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => written += n,
            }
        }
        rustix::fs::fcntl_add_seals(
            &file,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
        )?;
        // SAFETY: a new mapping chosen by the kernel (null hint), of a file
        // at least `len` long that can no longer shrink.
        let start = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                body.len(),
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::SHARED,
                &file,
                0,
            )?
        } as *const u8;
        let sealed = Sealed {
            start,
            len: body.len(),
            file,
        };
        let start = sealed.start as usize;
        MAPPINGS
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(start, (start + sealed.len, sealed.file.as_raw_fd()));
        LIVE.fetch_add(1, Ordering::Relaxed);
        Ok(sealed)
    }
}

impl AsRef<[u8]> for Sealed {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: mapped readable for `len` bytes until `drop`, and
        // unchangeable (sealed).
        unsafe { std::slice::from_raw_parts(self.start, self.len) }
    }
}

impl Drop for Sealed {
    fn drop(&mut self) {
        // Out of the table before the mapping and the descriptor go, so a
        // lookup never finds a stale entry.
        MAPPINGS
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(self.start as usize));
        LIVE.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: mapped in `new`, and no slice of it outlives `self` (every
        // `Bytes` pointing into it holds `self`).
        if let Err(e) = unsafe { rustix::mm::munmap(self.start as *mut _, self.len) } {
            tracing::warn!(error = %e, "munmap of a sealed answer failed: {e}");
        }
    }
}

/// Slices shorter than this are written as they are, without a look in
/// the table: a small answer's head and body (most requests) then cost no
/// lock, and the short tail of a sealed answer is copied, which is as
/// correct (the bytes are the same) and cheaper than a `sendfile`.
const FIND_MIN: usize = 4096;

/// The sealed file and offset holding `slice`, if it lies in a mapping.
fn find(slice: &[u8]) -> Option<(RawFd, u64)> {
    if slice.len() < FIND_MIN || LIVE.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let start = slice.as_ptr() as usize;
    let mappings = MAPPINGS.read().unwrap_or_else(|p| p.into_inner());
    let (&base, &(end, fd)) = mappings.range(..=start).next_back()?;
    (start + slice.len() <= end).then_some((fd, (start - base) as u64))
}

/// A socket `sendfile` can write to, with the runtime's readiness.
pub trait SendfileTarget {
    /// Writes up to `len` bytes of `file` from `offset`, as much as the
    /// socket takes now.
    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        file: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>>;
}

macro_rules! sendfile_target {
    ($($socket:ty),*) => {$(
        impl SendfileTarget for $socket {
            fn poll_sendfile(
                &self,
                cx: &mut Context<'_>,
                file: BorrowedFd<'_>,
                offset: u64,
                len: usize,
            ) -> Poll<io::Result<usize>> {
                loop {
                    std::task::ready!(self.poll_write_ready(cx))?;
                    let mut at = offset;
                    let sent = self.try_io(Interest::WRITABLE, || {
                        rustix::fs::sendfile(self.as_fd(), file, Some(&mut at), len)
                            .map_err(io::Error::from)
                    });
                    match sent {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        other => return Poll::Ready(other),
                    }
                }
            }
        }
    )*};
}

sendfile_target!(tokio::net::UnixStream, tokio::net::TcpStream);

/// The send buffer a connection gets while a sealed answer goes out.
///
/// With the default (some 200 KB on Linux) a 640 KB list took four
/// `sendfile` calls and three waits for the client; with this it takes
/// one, and vfiod spent a fifth less CPU per answer. It costs no copy:
/// the buffer then holds references to the sealed pages. It is set back
/// as soon as the answer is handed over, so that a slow reader of
/// anything else (an event stream) is held to the usual bound.
const SEALED_SEND_BUFFER: usize = 2 * 1024 * 1024;

/// A connection's stream that sends slices of sealed answers with
/// `sendfile` and everything else as the stream would. It never changes
/// the bytes, only the way they leave; the server stacks its rewriting of
/// hyper's own error answers (`JsonAutoErrors`) on top of it, and why the
/// two stay apart is written there.
pub struct ZeroCopy<S> {
    inner: S,
    /// The send buffer size to go back to, while it is raised to
    /// [`SEALED_SEND_BUFFER`].
    raised_from: Option<usize>,
}

impl<S> ZeroCopy<S> {
    /// Wraps a connection's stream.
    pub fn new(inner: S) -> Self {
        ZeroCopy {
            inner,
            raised_from: None,
        }
    }
}

impl<S: AsFd> ZeroCopy<S> {
    /// Raises the send buffer for a sealed answer; a refusal only costs
    /// speed.
    fn raise_send_buffer(&mut self) {
        use nix::sys::socket::{getsockopt, setsockopt, sockopt::SndBuf};
        if self.raised_from.is_some() {
            return;
        }
        let Ok(current) = getsockopt(&self.inner, SndBuf) else {
            return;
        };
        if current < SEALED_SEND_BUFFER
            && setsockopt(&self.inner, SndBuf, &SEALED_SEND_BUFFER).is_ok()
        {
            self.raised_from = Some(current);
        }
    }

    /// Puts the send buffer back as it was before [`raise_send_buffer`].
    fn restore_send_buffer(&mut self) {
        use nix::sys::socket::{setsockopt, sockopt::SndBuf};
        if let Some(was) = self.raised_from.take() {
            // The kernel reports twice what was asked for (its
            // bookkeeping), and doubles what is asked for.
            let _ = setsockopt(&self.inner, SndBuf, &(was / 2));
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ZeroCopy<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + SendfileTarget + AsFd + Unpin> ZeroCopy<S> {
    /// `sendfile` of a slice found in a sealed file; where the kernel
    /// refuses it, the slice is written as any other, now and from then on.
    fn poll_send_sealed(
        &mut self,
        cx: &mut Context<'_>,
        (fd, offset): (RawFd, u64),
        slice: &[u8],
    ) -> Poll<io::Result<usize>> {
        // SAFETY: the file stays open while its mapping is alive, and the
        // mapping is alive while `slice`, which borrows from it, is.
        let file = unsafe { BorrowedFd::borrow_raw(fd) };
        self.raise_send_buffer();
        let sent = std::task::ready!(self.inner.poll_sendfile(cx, file, offset, slice.len()));
        if !matches!(&sent, Ok(n) if *n < slice.len()) {
            // All of it handed over (or failed): back to the usual bound.
            self.restore_send_buffer();
        }
        match sent {
            Err(e) if refused(&e) => {
                if !REFUSED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "sendfile is refused ({e}); large answers are copied into each socket from now on");
                }
                Pin::new(&mut self.inner).poll_write(cx, slice)
            }
            other => Poll::Ready(other),
        }
    }
}

/// An error that says `sendfile` cannot be used here at all, as opposed to
/// one about this connection.
fn refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EINVAL | nix::libc::ENOSYS | nix::libc::EPERM | nix::libc::EOPNOTSUPP)
    )
}

impl<S: AsyncWrite + SendfileTarget + AsFd + Unpin> AsyncWrite for ZeroCopy<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(found) = find(buf) {
            return self.poll_send_sealed(cx, found, buf);
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // What comes before the first sealed slice goes out as it would
        // (hyper's head, mostly); the sealed slice on the next call.
        match bufs.iter().position(|b| find(b).is_some()) {
            Some(0) => {
                let found = find(&bufs[0]).expect("found just now");
                self.poll_send_sealed(cx, found, &bufs[0])
            }
            Some(first) => Pin::new(&mut self.inner).poll_write_vectored(cx, &bufs[..first]),
            None => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn small_bodies_stay_on_the_heap_and_large_ones_are_found() {
        let small = seal(body(100));
        assert!(find(&small).is_none());
        let large = seal(body(3 * ZERO_COPY_MIN + 5));
        assert_eq!(&large[..], &body(3 * ZERO_COPY_MIN + 5)[..]);
        let (_, offset) = find(&large[1000..9000]).expect("a slice of a sealed body");
        assert_eq!(offset, 1000);
        assert!(
            find(&large[1000..1100]).is_none(),
            "short slices are copied"
        );
        let addr = large.as_ptr() as usize;
        drop(large);
        // Gone from the table with its mapping.
        let mappings = MAPPINGS.read().unwrap();
        assert!(!mappings.contains_key(&addr));
    }

    #[test]
    fn a_sealed_body_cannot_be_changed_through_its_file() {
        let sealed = Sealed::new(&body(ZERO_COPY_MIN)).unwrap();
        assert!(rustix::io::write(&sealed.file, b"x").is_err());
        assert!(rustix::fs::ftruncate(&sealed.file, 1).is_err());
    }

    /// What a client reads is the head and the sealed body, whole and in
    /// order, also when the body is much larger than the socket's buffer
    /// and the answer dropped before the client reads it.
    #[tokio::test]
    async fn a_client_reads_exactly_what_was_sealed() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let want = body(2 * 1024 * 1024 + 17);
        let sealed = seal(want.clone());
        assert!(find(&sealed).is_some());
        let head = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        let expected: Vec<u8> = head.iter().chain(want.iter()).copied().collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut writer = ZeroCopy::new(ours);
        let mut parts = [Bytes::from(head), sealed];
        let mut index = 0;
        while index < parts.len() {
            let slices: Vec<io::IoSlice<'_>> =
                parts[index..].iter().map(|p| io::IoSlice::new(p)).collect();
            let mut n = writer.write_vectored(&slices).await.unwrap();
            while n > 0 {
                let take = n.min(parts[index].len());
                bytes::Buf::advance(&mut parts[index], take);
                n -= take;
                if parts[index].is_empty() {
                    index += 1;
                }
            }
        }
        drop(parts);
        // The send buffer is back where it was once the body is out.
        assert!(writer.raised_from.is_none());
        writer.shutdown().await.unwrap();
        drop(writer);
        assert!(reader.await.unwrap() == expected);
    }
}
