//! Types for secret bytes: KEK material and seed plaintexts.
//!
//! Secrets are read only through `expose_secret()` at the call that needs
//! them, so `grep expose_secret` is the audit list. None of these types
//! derives `Clone`, `Serialize` or a `Debug` that shows bytes, and all of
//! them zero their memory on drop. KEKs and PINs live in pages of their own
//! that are left out of core dumps and locked into RAM ([`key_memory`]).

use std::fmt;

use rand::{TryRng, rngs::SysRng};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

mod locked;

pub(crate) use locked::LockedBox;
use locked::LockedBytes;
pub use locked::{KeyMemory, key_memory};

/// Length of a key-encryption key: AES-256.
pub const KEK_LEN: usize = 32;

/// A 256-bit key-encryption key held in process memory (the local backend),
/// in a locked page excluded from core dumps; zeroed on drop.
pub struct Kek(LockedBytes);

impl ZeroizeOnDrop for Kek {}

impl Kek {
    /// Draws a fresh key from the operating system's random number generator.
    ///
    /// # Errors
    /// Fails only when the OS cannot provide entropy; no weaker source is
    /// ever used in its place.
    pub fn generate() -> Result<Self, RandomError> {
        let mut bytes = Zeroizing::new([0; KEK_LEN]);
        fill_random(&mut *bytes)?;
        Ok(Self::from_bytes(*bytes))
    }

    /// Wraps bytes decoded from a keyring file. The caller zeroes its copy.
    pub fn from_bytes(bytes: [u8; KEK_LEN]) -> Self {
        let mut bytes = bytes;
        let kek = Self(LockedBytes::new(&bytes));
        bytes.zeroize();
        kek
    }

    /// A one-way fingerprint of the key, to tell whether two copies of a
    /// version hold the same material without comparing keys. Never logged.
    pub fn fingerprint(&self) -> KeyFingerprint {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"kekd/key-fingerprint/v1\0");
        h.update(self.expose_secret());
        KeyFingerprint(h.finalize().into())
    }

    /// The raw key. Call only where the key is handed to a cipher or encoder.
    pub fn expose_secret(&self) -> &[u8; KEK_LEN] {
        match self.0.as_slice().try_into() {
            Ok(key) => key,
            // `from_bytes` is the only constructor and copies exactly KEK_LEN.
            Err(_) => unreachable!("a KEK holds {KEK_LEN} bytes"),
        }
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

/// SHA-256 over a domain label and a key: equal exactly when the keys are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyFingerprint([u8; 32]);

impl KeyFingerprint {
    /// A fingerprint of public bytes under a domain label (for key handles
    /// whose material cannot be read, such as HSM objects).
    pub fn of_public(domain: &[u8], bytes: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(domain);
        h.update(bytes);
        Self(h.finalize().into())
    }
}

impl fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyFingerprint(<redacted>)")
    }
}

/// A plaintext seed: what the apiserver asks us to wrap, or what we unwrapped.
pub struct Plaintext(Zeroizing<Vec<u8>>);

impl Plaintext {
    /// Takes ownership of plaintext bytes; they are zeroed on drop.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The plaintext. Call only where it is sealed or returned to the caller.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// Hands the bytes on (to a response message) without copying them.
    pub fn into_inner(mut self) -> Vec<u8> {
        std::mem::take(&mut *self.0)
    }

    /// Number of bytes; lengths are safe to log.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the plaintext is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Plaintext(<{} bytes redacted>)", self.0.len())
    }
}

/// A PKCS#11 user PIN. Read from a file or the environment, never argv;
/// held in a locked page excluded from core dumps, zeroed on drop.
pub struct Pin(LockedBytes);

impl Pin {
    /// Takes a PIN (trailing newlines already removed by the caller); the
    /// string it came in is zeroed.
    pub fn new(pin: String) -> Self {
        let pin = Zeroizing::new(pin);
        Self(LockedBytes::new(pin.as_bytes()))
    }

    /// The PIN. Call only where it is handed to C_Login.
    pub fn expose_secret(&self) -> &str {
        match std::str::from_utf8(self.0.as_slice()) {
            Ok(pin) => pin,
            // `new` is the only constructor and copies a `String`'s bytes.
            Err(_) => unreachable!("a PIN is the bytes of a String"),
        }
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

/// Stack [`with_scrubbed_stack`] zeroes after a key is decoded or a cipher
/// built (once per version and load): far more than that uses, even in an
/// unoptimized build, and far less than any thread kekd runs it on has
/// (tokio's get 2 MiB).
pub(crate) const SCRUB_AFTER_SETUP: usize = 64 * 1024;

/// Stack [`with_scrubbed_stack`] zeroes after each seal or open. The block
/// cipher copies round keys into registers and the compiler spills them (the
/// VAES backends broadcast every round key into a 960-byte array), and an
/// unoptimized build copies more: `tests/integration/secrets.rs` finds copies left with
/// 4 KiB in a debug build and none with 16 KiB; an optimized build left
/// three with 4 KiB. Zeroing 16 KiB costs about a microsecond per call,
/// little beside the gRPC call around it (`docs/benchmarks.md`).
pub(crate) const SCRUB_AFTER_CALL: usize = 16 * 1024;

/// Runs `f` (which handles raw key bytes or round keys), then zeroes `BYTES`
/// of stack below this frame, where `f`'s frames were.
///
/// Whatever `f` left there — the decoded key passed by value, a cipher built
/// on the stack before it was moved into its locked page, a hash state over
/// the key, spilled round keys — would otherwise stay in the thread's stack,
/// which is neither locked nor left out of core dumps, until overwritten.
/// `f`'s result should hold its secrets in locked memory only. (Registers
/// are not cleared: the next code to run overwrites them.)
#[inline(never)]
pub(crate) fn with_scrubbed_stack<const BYTES: usize, R>(f: impl FnOnce() -> R) -> R {
    let result = run_below(f);
    scrub_stack::<BYTES>();
    result
}

/// A frame of its own for `f`, below `with_scrubbed_stack`'s.
#[inline(never)]
fn run_below<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Zeroes `BYTES` of stack starting just below the caller's frame: a zeroed
/// array handed to `black_box`, which the compiler must assume reads it, so
/// the stores cannot be dropped as dead or the array shrunk away.
#[inline(never)]
fn scrub_stack<const BYTES: usize>() {
    let mut scratch = [0u8; BYTES];
    std::hint::black_box(&mut scratch);
}

/// The operating system's random number generator failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct RandomError(String);

/// Fills `dest` from the operating system's RNG (getrandom(2) on Linux).
///
/// # Errors
/// When the OS RNG fails; callers fail the operation rather than fall back.
pub fn fill_random(dest: &mut [u8]) -> Result<(), RandomError> {
    SysRng
        .try_fill_bytes(dest)
        .map_err(|e| RandomError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_bytes() {
        let kek = Kek::from_bytes([0xAB; KEK_LEN]);
        assert_eq!(format!("{kek:?}"), "Kek(<redacted>)");
        let pt = Plaintext::new(vec![0xAB; 32]);
        assert_eq!(format!("{pt:?}"), "Plaintext(<32 bytes redacted>)");
    }

    #[test]
    fn generated_keys_differ() {
        let a = Kek::generate().unwrap();
        let b = Kek::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_ne!(a.expose_secret(), &[0; KEK_LEN]);
    }
}
