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
        let mut map = match MmapMut::map_anon(bytes.len().max(1)) {
            Ok(map) => map,
            // An anonymous mapping fails only when the process is out of
            // memory: handle it as the global allocator handles that.
            Err(_) => std::alloc::handle_alloc_error(
                std::alloc::Layout::array::<u8>(bytes.len().max(1))
                    .unwrap_or(std::alloc::Layout::new::<u8>()),
            ),
        };
        protect(&map);
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
}
