//! Little-endian integers of the wire formats, the one place they are read.
//!
//! Two ways: at a fixed offset of a payload whose length the decoder has checked ([`u16_at`],
//! [`u32_at`], [`u64_at`]: past the end they read 0, never a panic, so a missed check is a wrong
//! value refused further on rather than a crash on input from outside), or in sequence from a
//! [`Cursor`], which refuses to run past the end.

/// The `N` bytes at `at`, or zeros past the end of `b`.
fn bytes_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    at.checked_add(N)
        .and_then(|end| b.get(at..end))
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; N])
}

/// The `u16` at `at` (0 past the end).
pub fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes_at(b, at))
}

/// The `u32` at `at` (0 past the end).
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes_at(b, at))
}

/// The `u64` at `at` (0 past the end).
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes_at(b, at))
}

/// Ran past the end of a [`Cursor`]'s bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PastTheEnd;

/// Reads a payload front to back.
#[derive(Debug)]
pub struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `b`.
    pub fn new(b: &'a [u8]) -> Self {
        Self { b }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], PastTheEnd> {
        if self.b.len() < n {
            return Err(PastTheEnd);
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    /// The next `u16`.
    pub fn u16(&mut self) -> Result<u16, PastTheEnd> {
        self.take(2).map(|s| u16_at(s, 0))
    }

    /// The next `u32`.
    pub fn u32(&mut self) -> Result<u32, PastTheEnd> {
        self.take(4).map(|s| u32_at(s, 0))
    }

    /// The next `u64`.
    pub fn u64(&mut self) -> Result<u64, PastTheEnd> {
        self.take(8).map(|s| u64_at(s, 0))
    }

    /// What is left.
    pub fn rest(&self) -> &'a [u8] {
        self.b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_offsets_read_little_endian_and_zero_past_the_end() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(u16_at(&b, 0), 0x0201);
        assert_eq!(u32_at(&b, 1), 0x0504_0302);
        assert_eq!(u64_at(&b, 1), 0x0908_0706_0504_0302);
        assert_eq!(u64_at(&b, 2), 0, "one byte short");
        assert_eq!(u32_at(&b, usize::MAX), 0, "an offset that overflows");
    }

    #[test]
    fn a_cursor_reads_in_order_and_refuses_to_run_past_the_end() {
        let b = [1u8, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 9];
        let mut c = Cursor::new(&b);
        assert_eq!((c.u16(), c.u32(), c.u64()), (Ok(1), Ok(2), Ok(3)));
        assert_eq!(c.rest(), &[9]);
        assert_eq!(c.u16(), Err(PastTheEnd));
        assert_eq!(c.take(1), Ok(&[9][..]), "a refused read takes nothing");
        assert_eq!(c.take(0), Ok(&[][..]));
    }
}
