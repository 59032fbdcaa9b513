//! Wire protocols: frames and sessions, not policy. A session asks its
//! [`crate::proxy::Guard`] about each statement and turns a refusal into the
//! protocol's own error.

pub mod mysql;
pub mod postgres;

/// Why the agent's own login (a brokered one) failed, in either protocol.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The server refused it: its SQLSTATE (PostgreSQL) or error number
    /// (MySQL), and its message.
    #[error("{message}")]
    Refused { code: String, message: String },
    /// The server asked for something the agent cannot answer.
    #[error("{0}")]
    Unsupported(String),
    #[error("server protocol violation: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A connection's read buffer while its reads are small: what an idle
/// connection holds per direction.
pub const SMALL_READ: usize = 4096;
/// A read buffer while a transfer fills it.
pub const READ_CHUNK: usize = 64 * 1024;

/// Makes room in a read buffer for the next read, `last` being how much
/// the previous read brought. A buffer that a transfer grew is given back
/// once it is empty and reads are small again, so that idle connections
/// hold [`SMALL_READ`] per direction, not [`READ_CHUNK`]; an empty small
/// buffer is reused in place, so steady small traffic allocates nothing.
pub fn make_room(buf: &mut bytes::BytesMut, last: usize) {
    let streaming = last >= SMALL_READ / 2;
    if buf.is_empty() {
        if streaming {
            buf.reserve(READ_CHUNK);
        } else if buf.capacity() > SMALL_READ {
            *buf = bytes::BytesMut::with_capacity(SMALL_READ);
        } else if buf.capacity() == 0 {
            *buf = SPARE
                .with_borrow_mut(Vec::pop)
                .unwrap_or_else(|| bytes::BytesMut::with_capacity(SMALL_READ));
        } else {
            buf.reserve(SMALL_READ);
        }
    } else if buf.capacity() - buf.len() < SMALL_READ / 4 {
        buf.reserve(if streaming { READ_CHUNK } else { SMALL_READ });
    }
}

thread_local! {
    /// Empty small read buffers that idle connections of this thread gave
    /// back ([`release`]), for the next connection whose input arrives: a
    /// request-reply session releases and takes one per message, and the
    /// pool spares the allocator a page freed and set up again each time.
    static SPARE: std::cell::RefCell<Vec<bytes::BytesMut>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// How many empty buffers a thread keeps for reuse: [`SMALL_READ`] each,
/// 128 KiB per worker at most, however many connections are idle.
const SPARE_BUFFERS: usize = 32;

/// Takes an idle connection's read buffer (empty), leaving it none; a
/// small one is kept for reuse by [`make_room`], a large one is freed.
pub fn release(buf: &mut bytes::BytesMut) {
    let mut spare = std::mem::take(buf);
    if !spare.is_empty() || spare.capacity() > SMALL_READ {
        return;
    }
    // Reclaims the bytes already read (in place for a buffer this
    // connection alone holds): a whole small buffer again.
    spare.reserve(SMALL_READ);
    if spare.capacity() != SMALL_READ {
        return;
    }
    SPARE.with_borrow_mut(|pool| {
        if pool.len() < SPARE_BUFFERS {
            pool.push(spare);
        }
    });
}

#[cfg(test)]
mod tests {
    use bytes::{Buf as _, BytesMut};

    use super::*;

    #[test]
    fn idle_buffers_are_reused_small_and_whole() {
        // A small buffer, partly read: given back whole, then taken again.
        let mut buf = BytesMut::with_capacity(SMALL_READ);
        let ptr = buf.as_ptr();
        buf.extend_from_slice(&[1; 300]);
        buf.advance(300);
        release(&mut buf);
        assert_eq!(buf.capacity(), 0);
        let mut next = BytesMut::new();
        make_room(&mut next, 0);
        assert_eq!(next.as_ptr(), ptr);
        assert_eq!(next.capacity(), SMALL_READ);
        // A transfer's large buffer is freed, not kept.
        let mut large = BytesMut::with_capacity(READ_CHUNK);
        let large_ptr = large.as_ptr();
        release(&mut large);
        let mut other = BytesMut::new();
        make_room(&mut other, 0);
        assert_ne!(other.as_ptr(), large_ptr);
        assert_eq!(other.capacity(), SMALL_READ);
        // The pool is bounded.
        for _ in 0..SPARE_BUFFERS * 2 {
            release(&mut BytesMut::with_capacity(SMALL_READ));
        }
        assert_eq!(SPARE.with_borrow(Vec::len), SPARE_BUFFERS);
    }

    #[test]
    fn read_buffers_grow_for_transfers_and_shrink_when_idle() {
        let mut buf = BytesMut::with_capacity(SMALL_READ);
        let ptr = buf.as_ptr();
        // Small traffic: the same allocation, reclaimed in place.
        for _ in 0..100 {
            buf.extend_from_slice(&[1; 300]);
            buf.advance(300);
            make_room(&mut buf, 300);
            assert_eq!(buf.as_ptr(), ptr);
            assert!(buf.capacity() >= SMALL_READ / 4);
        }
        // A transfer: reads fill the buffer, which grows.
        buf.extend_from_slice(&[1; 4000]);
        make_room(&mut buf, 4000);
        assert!(buf.capacity() - buf.len() >= READ_CHUNK);
        buf.advance(4000);
        make_room(&mut buf, 60_000);
        assert!(buf.capacity() >= READ_CHUNK);
        // It ends: the large buffer goes.
        make_room(&mut buf, 10);
        assert_eq!(buf.capacity(), SMALL_READ);
        // A partial message larger than the room left: more room.
        buf.extend_from_slice(&[1; 3500]);
        make_room(&mut buf, 100);
        assert!(buf.capacity() - buf.len() >= SMALL_READ);
    }
}
