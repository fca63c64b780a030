//! Memory for key bytes that stays out of core dumps and swap.
//!
//! Every [`LockedBytes`] is its own anonymous mapping (a page for a KEK):
//!
//! - `MADV_DONTDUMP`: the pages are left out of any core dump, even one taken
//!   by a debugger or a kernel that ignores `PR_SET_DUMPABLE`;
//! - `MADV_DONTFORK`: a child process never inherits them;
//! - `mlock`: they are never written to swap, where `RLIMIT_MEMLOCK` (or
//!   `CAP_IPC_LOCK`) allows. When it does not, kekd warns once and goes on:
//!   refusing to serve would be worse than a key that could reach swap.
//!
//! The bytes are zeroed before the mapping is unmapped.
//!
//! [`LockedBox`] holds a value (a cipher with its expanded key schedule) in
//! such a mapping: it is moved there once, right after it is built, and is
//! only ever borrowed afterwards, so no copy of it is made by a call. This
//! is the crate's one `unsafe` island (a `ptr::write` into the page, reads
//! through the page's pointer, and `drop_in_place`); each block states why
//! it is sound, and `key_pages_hold_a_value_that_never_moves` tests it.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, Ordering};

use memmap2::{Advice, MmapMut};
use tracing::warn;
use zeroize::Zeroize;

/// Key bytes in a locked, non-dumpable mapping of their own.
pub(crate) struct LockedBytes {
    map: MmapMut,
    len: usize,
}

impl LockedBytes {
    /// Copies `bytes` into a fresh mapping. The caller zeroes its copy.
    pub(crate) fn new(bytes: &[u8]) -> Self {
        let mut map = protected_map(bytes.len());
        map[..bytes.len()].copy_from_slice(bytes);
        Self {
            map,
            len: bytes.len(),
        }
    }

    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.map[..self.len]
    }

    /// The start of the mapping (for tests that read `/proc/self/smaps`).
    #[cfg(test)]
    pub(crate) fn address(&self) -> usize {
        self.map.as_ptr() as usize
    }
}

impl Drop for LockedBytes {
    fn drop(&mut self) {
        // Zero the whole mapping, not only `len`: nothing else was written
        // there, but this costs nothing and needs no argument.
        self.map[..].zeroize();
    }
}

/// A `T` in a locked, non-dumpable mapping of its own, where it stays until
/// it is dropped: moving a `LockedBox` moves the handle, never the value.
///
/// The value is moved into the page once, by [`LockedBox::new`]; whatever
/// copies building it left on the caller's stack are the caller's to scrub
/// ([`crate::secret::with_scrubbed_stack`]). On drop the value's own `Drop`
/// runs in place and then the whole page is zeroed.
pub(crate) struct LockedBox<T> {
    /// Page-aligned, at least `size_of::<T>()` bytes, holding an initialised
    /// `T` from `new` until `drop`. Never resized or handed out.
    map: MmapMut,
    /// The box owns a `T` (for `Send`, `Sync` and drop check).
    value: PhantomData<T>,
}

#[allow(unsafe_code)]
impl<T> LockedBox<T> {
    /// Moves `value` into a fresh locked mapping.
    pub(crate) fn new(value: T) -> Self {
        const {
            // mmap returns page-aligned memory: 4096 bytes on every target
            // kekd runs on, so any alignment up to that is met.
            assert!(align_of::<T>() <= 4096, "LockedBox needs page alignment");
        }
        let mut map = protected_map(size_of::<T>());
        let slot = map.as_mut_ptr().cast::<T>();
        // SAFETY: `slot` is the start of a fresh anonymous mapping that only
        // this box refers to, at least `size_of::<T>()` bytes long and
        // page-aligned, so valid for a write of one `T` (checked above).
        // Writing initialises it; nothing was there to drop.
        unsafe { slot.write(value) };
        Self {
            map,
            value: PhantomData,
        }
    }

    /// The start of the mapping (for tests that read `/proc/self/smaps`).
    #[cfg(test)]
    pub(crate) fn address(&self) -> usize {
        self.map.as_ptr() as usize
    }
}

#[allow(unsafe_code)]
impl<T> std::ops::Deref for LockedBox<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: `new` wrote an initialised, aligned `T` at the start of the
        // mapping, which lives (unmoved: the mapping's address never changes)
        // as long as `self`; the only mutable access is in `drop`, so a
        // shared borrow tied to `&self` cannot alias one.
        unsafe { &*self.map.as_ptr().cast::<T>() }
    }
}

#[allow(unsafe_code)]
impl<T> Drop for LockedBox<T> {
    fn drop(&mut self) {
        let slot = self.map.as_mut_ptr().cast::<T>();
        // SAFETY: the `T` written by `new` is still there, initialised and
        // aligned, and is dropped exactly once: here, after which the bytes
        // are only zeroed and unmapped, never read as a `T` again.
        unsafe { std::ptr::drop_in_place(slot) };
        self.map[..].zeroize();
    }
}

/// A fresh anonymous mapping of at least `len` bytes (at least one page),
/// locked and left out of core dumps and children where the kernel allows.
fn protected_map(len: usize) -> MmapMut {
    let map = match MmapMut::map_anon(len.max(1)) {
        Ok(map) => map,
        // An anonymous mapping fails only when the process is out of
        // memory: handle it as the global allocator handles that.
        Err(_) => std::alloc::handle_alloc_error(
            std::alloc::Layout::array::<u8>(len.max(1)).unwrap_or(std::alloc::Layout::new::<u8>()),
        ),
    };
    protect(&map);
    map
}

/// Whether key memory is protected as intended, for `admin doctor` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMemory {
    /// No key bytes have been placed in locked memory yet.
    Unused,
    /// Every mapping so far is locked and excluded from core dumps.
    Protected,
    /// At least one mapping could not be locked (it is still excluded from
    /// core dumps when the kernel supports `MADV_DONTDUMP`).
    NotLocked,
}

const UNUSED: u8 = 0;
const PROTECTED: u8 = 1;
const NOT_LOCKED: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNUSED);
static WARNED_ADVICE: AtomicU8 = AtomicU8::new(0);

/// How key memory has fared in this process.
pub fn key_memory() -> KeyMemory {
    match STATE.load(Ordering::Relaxed) {
        UNUSED => KeyMemory::Unused,
        PROTECTED => KeyMemory::Protected,
        _ => KeyMemory::NotLocked,
    }
}

fn protect(map: &MmapMut) {
    for advice in [Advice::DontDump, Advice::DontFork] {
        if let Err(e) = map.advise(advice)
            && WARNED_ADVICE.swap(1, Ordering::Relaxed) == 0
        {
            warn!(error = %e, ?advice, "cannot advise the kernel about key memory; it may appear in a core dump made by other means than a crash");
        }
    }
    match map.lock() {
        Ok(()) => {
            let _ = STATE.compare_exchange(UNUSED, PROTECTED, Ordering::Relaxed, Ordering::Relaxed);
        }
        Err(e) => {
            if STATE.swap(NOT_LOCKED, Ordering::Relaxed) != NOT_LOCKED {
                let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock);
                let limit = limit
                    .current
                    .map_or_else(|| "unlimited".to_owned(), |n| format!("{n} bytes"));
                warn!(
                    error = %e,
                    memlock_limit = %limit,
                    "cannot lock key memory into RAM, so keys could be written to swap; \
                     raise the memlock limit (systemd: LimitMEMLOCK=1M; a container: \
                     ulimit memlock or CAP_IPC_LOCK) or disable swap on this node"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags`, `Locked` and `Size` of the smaps entry holding `addr`
    /// (the kernel merges neighbouring key pages with the same flags into
    /// one entry, so it may start before `addr` or end after its page).
    fn smaps_entry(addr: usize) -> (String, String, String) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let holds = |line: &str| {
            let Some((range, _)) = line.split_once(' ') else {
                return false;
            };
            let Some((from, to)) = range.split_once('-') else {
                return false;
            };
            match (
                usize::from_str_radix(from, 16),
                usize::from_str_radix(to, 16),
            ) {
                (Ok(from), Ok(to)) => from <= addr && addr < to,
                _ => false,
            }
        };
        let mut lines = smaps.lines().skip_while(|l| !holds(l));
        assert!(lines.next().is_some(), "mapping of {addr:x} not in smaps");
        let (mut flags, mut locked, mut size) = (String::new(), String::new(), String::new());
        for line in lines {
            if let Some(rest) = line.strip_prefix("VmFlags:") {
                flags = rest.trim().to_owned();
                break;
            }
            if let Some(rest) = line.strip_prefix("Locked:") {
                locked = rest.trim().to_owned();
            }
            if let Some(rest) = line.strip_prefix("Size:") {
                size = rest.trim().to_owned();
            }
        }
        (flags, locked, size)
    }

    #[test]
    fn key_pages_are_not_dumped_not_inherited_and_locked_when_allowed() {
        let key = LockedBytes::new(&[0x5A; 32]);
        assert_eq!(key.as_slice(), &[0x5A; 32]);
        let (flags, locked, size) = smaps_entry(key.address());
        let flags: Vec<&str> = flags.split_whitespace().collect();
        assert!(flags.contains(&"dd"), "MADV_DONTDUMP missing: {flags:?}");
        assert!(flags.contains(&"dc"), "MADV_DONTFORK missing: {flags:?}");
        match key_memory() {
            KeyMemory::Protected => {
                assert!(flags.contains(&"lo"), "not locked: {flags:?}");
                assert_eq!(locked, size, "the whole mapping is locked");
            }
            // A test runner without CAP_IPC_LOCK and a zero memlock limit.
            other => assert_eq!(other, KeyMemory::NotLocked),
        }
    }

    /// A value with a large alignment, that counts its drops.
    #[repr(align(64))]
    struct Tracked<'a> {
        bytes: [u8; 200],
        drops: &'a std::sync::atomic::AtomicUsize,
    }

    impl Drop for Tracked<'_> {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn key_pages_hold_a_value_that_never_moves() {
        let drops = std::sync::atomic::AtomicUsize::new(0);
        let boxed = LockedBox::new(Tracked {
            bytes: [0xA5; 200],
            drops: &drops,
        });
        let at = std::ptr::from_ref::<Tracked<'_>>(&boxed) as usize;
        assert_eq!(at, boxed.address(), "the value is at the start of its page");
        assert_eq!(at % 64, 0, "aligned for its type");
        // Moving the box (into a Vec, out again) moves the handle only.
        let mut moved = vec![boxed];
        let boxed = moved.pop().unwrap();
        assert_eq!(std::ptr::from_ref::<Tracked<'_>>(&boxed) as usize, at);
        assert_eq!(boxed.bytes, [0xA5; 200]);
        let (flags, _, _) = smaps_entry(at);
        let flags: Vec<&str> = flags.split_whitespace().collect();
        assert!(flags.contains(&"dd"), "MADV_DONTDUMP missing: {flags:?}");
        assert!(flags.contains(&"dc"), "MADV_DONTFORK missing: {flags:?}");
        if key_memory() == KeyMemory::Protected {
            assert!(flags.contains(&"lo"), "not locked: {flags:?}");
        }
        assert_eq!(drops.load(Ordering::Relaxed), 0);
        drop(boxed);
        assert_eq!(drops.load(Ordering::Relaxed), 1, "dropped once, in place");
    }
}
