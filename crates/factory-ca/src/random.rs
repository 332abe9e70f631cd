//! Randomness from the OS CSPRNG: serial numbers, temporary file names.

use aws_lc_rs::rand::SystemRandom;

use crate::Error;

/// Fills `buf` from the OS CSPRNG.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), Error> {
    use aws_lc_rs::rand::SecureRandom;
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| Error::Crypto { op: "random" })
}
