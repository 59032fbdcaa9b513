//! Where a server's reply to one command ends. MySQL frames carry no type,
//! so the agent follows the reply's grammar (result sets, prepare replies,
//! authentication exchanges) packet by packet. It reads the first byte of
//! rows and column definitions, and the whole of the small packets that
//! decide where the reply goes next (OK, ERR, EOF, column counts,
//! COM_STMT_PREPARE_OK, authentication packets); everything else streams
//! through unread.

use super::codec::{
    CodecError, Header, MAX_PACKET, PrepareOk, eof_status, err_fields, lenenc_int, ok_status,
    prepare_ok, status,
};
use crate::proxy::{Completion, ServerError};

/// The reply a command gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// One packet: OK, ERR, EOF or (COM_STATISTICS) a bare string.
    OnePacket,
    /// Result sets, OK or ERR, each possibly followed by more
    /// (COM_QUERY, COM_STMT_EXECUTE, COM_PROCESS_INFO).
    Results,
    /// Rows then EOF, or ERR (COM_STMT_FETCH, and COM_FIELD_LIST's
    /// column definitions).
    Rows,
    /// COM_STMT_PREPARE_OK with parameter and column definitions, or ERR.
    Prepare,
    /// An authentication exchange, ended by OK or ERR.
    Auth,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    ResultStart,
    Columns { left: u64 },
    ColumnsEof,
    Rows,
    LocalInfile,
    PrepareStart,
    PrepDefs { left: u64, columns_after: u64 },
    PrepEof { columns_after: u64 },
    OnePacket,
    Auth,
    Done,
}

/// What a packet meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Not enough of the packet yet: feed it again with more of it (never
    /// more than the whole packet is needed). Nothing changed.
    NeedMore,
    /// Read; the reply goes on.
    More,
    /// The reply is complete; `ok` is false when it ended in ERR.
    Done { ok: bool },
    /// A LOCAL INFILE request: the client's file comes next, then
    /// [`Reply::resume`] and the reply goes on.
    LocalInfile,
    /// Authentication: the server now waits for one packet from the client.
    ClientTurn,
}

/// Follows one reply.
#[derive(Debug)]
pub struct Reply {
    state: State,
    deprecate_eof: bool,
    next_seq: u8,
    /// The previous packet was 0xFFFFFF long: this one continues it.
    continuing: bool,
    prepared: Option<PrepareOk>,
    /// Rows of the result set being read.
    rows: u64,
    results: Results,
}

/// How each result of a reply (result set, OK or ERR) ended: rows
/// returned or affected, or the error. The first is kept inline, further
/// ones (multi-statement queries, procedures) in a list.
#[derive(Debug, Default)]
pub struct Results {
    first: Option<Completion>,
    more: Vec<Completion>,
}

impl Results {
    /// In order.
    pub fn iter(&self) -> impl Iterator<Item = Completion> + '_ {
        self.first.iter().chain(self.more.iter()).copied()
    }

    /// All as one: rows added up, or the first error.
    #[must_use]
    pub fn completion(&self) -> Completion {
        let mut rows = None;
        for c in self.iter() {
            match c {
                Completion::Done { error: Some(_), .. } => return c,
                Completion::Done { rows: Some(n), .. } => rows = Some(rows.unwrap_or(0) + n),
                _ => {}
            }
        }
        Completion::rows(rows)
    }

    fn push(&mut self, c: Completion) {
        if self.first.is_none() {
            self.first = Some(c);
        } else {
            self.more.push(c);
        }
    }
}

fn malformed(what: &'static str) -> CodecError {
    CodecError::Malformed(what)
}

impl Reply {
    /// A reply whose first packet carries `seq` (the command's last
    /// sequence id plus one).
    #[must_use]
    pub fn new(expect: Expect, seq: u8, deprecate_eof: bool) -> Self {
        Self {
            state: match expect {
                Expect::OnePacket => State::OnePacket,
                Expect::Results => State::ResultStart,
                Expect::Rows => State::Rows,
                Expect::Prepare => State::PrepareStart,
                Expect::Auth => State::Auth,
            },
            deprecate_eof,
            next_seq: seq,
            continuing: false,
            prepared: None,
            rows: 0,
            results: Results::default(),
        }
    }

    /// How the results read so far ended; takes them.
    pub fn take_results(&mut self) -> Results {
        std::mem::take(&mut self.results)
    }

    fn ended(&mut self, c: Completion) {
        self.rows = 0;
        self.results.push(c);
    }

    fn ended_in_error(&mut self, p: &[u8]) {
        let e = err_fields(p).map_or(ServerError::mysql(0, None), |f| {
            ServerError::mysql(f.code, f.sqlstate)
        });
        self.ended(Completion::error(e));
    }

    /// Sequence id the next packet must carry, from either peer.
    #[must_use]
    pub fn next_seq(&self) -> u8 {
        self.next_seq
    }

    /// The COM_STMT_PREPARE_OK read, if any.
    #[must_use]
    pub fn prepared(&self) -> Option<PrepareOk> {
        self.prepared
    }

    #[must_use]
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Accounts for a packet the client sends within the reply (a LOCAL
    /// INFILE chunk, an authentication answer), or that the agent sends
    /// in the client's place.
    ///
    /// # Errors
    /// When its sequence id is not the one due.
    pub fn client_packet(&mut self, seq: u8) -> Result<(), CodecError> {
        self.check_seq(seq)?;
        self.next_seq = seq.wrapping_add(1);
        Ok(())
    }

    /// After the client's LOCAL INFILE data: the server's OK or ERR for the
    /// statement comes next (and more results may follow it).
    pub fn resume(&mut self) {
        if self.state == State::LocalInfile {
            self.state = State::ResultStart;
        }
    }

    fn check_seq(&self, seq: u8) -> Result<(), CodecError> {
        if seq == self.next_seq {
            Ok(())
        } else {
            Err(CodecError::OutOfOrder {
                expected: self.next_seq,
                got: seq,
            })
        }
    }

    /// Reads one server packet: its header and as much of its payload as
    /// has arrived (`prefix`, at most `h.len` bytes).
    ///
    /// # Errors
    /// A sequence id out of order, or a packet the reply's grammar does
    /// not allow there.
    pub fn feed(&mut self, h: Header, prefix: &[u8]) -> Result<Step, CodecError> {
        self.check_seq(h.seq)?;
        let long = h.len == MAX_PACKET;
        if self.continuing {
            self.next_seq = h.seq.wrapping_add(1);
            self.continuing = long;
            return Ok(Step::More);
        }
        let whole = prefix.len() >= h.len;
        let first = prefix.first().copied();
        if h.len > 0 && first.is_none() {
            return Ok(Step::NeedMore);
        }
        // A packet that decides where the reply goes must be read whole,
        // and such packets are small: one of 16 MiB is an attack.
        let decisive = match (self.state, first) {
            (State::Columns { .. } | State::PrepDefs { .. }, _) => false,
            (State::Rows, Some(0xfe | 0xff)) => !long,
            (State::Rows, _) => false,
            _ => true,
        };
        if decisive {
            if long {
                return Err(malformed(
                    "reply packet of 16 MiB where a short one was due",
                ));
            }
            if !whole {
                return Ok(Step::NeedMore);
            }
        }
        let payload = prefix.get(..h.len).unwrap_or(prefix);
        let (state, step) = self.next(first, payload, long)?;
        self.state = state;
        self.next_seq = h.seq.wrapping_add(1);
        self.continuing = long;
        Ok(step)
    }

    /// The state after a packet and what it meant. Decisive packets come
    /// whole; for the others only `first` is read.
    fn next(
        &mut self,
        first: Option<u8>,
        p: &[u8],
        long: bool,
    ) -> Result<(State, Step), CodecError> {
        let more = |s| Ok((s, Step::More));
        let done = |ok| Ok((State::Done, Step::Done { ok }));
        match self.state {
            State::ResultStart | State::LocalInfile => match first {
                Some(0x00) => {
                    let st = ok_status(p).ok_or(malformed("OK packet"))?;
                    let affected = p.get(1..).and_then(lenenc_int).map(|(n, _)| n);
                    self.ended(Completion::rows(affected));
                    if st & status::MORE_RESULTS_EXISTS != 0 {
                        more(State::ResultStart)
                    } else {
                        done(true)
                    }
                }
                Some(0xff) => {
                    self.ended_in_error(p);
                    done(false)
                }
                Some(0xfb) => Ok((State::LocalInfile, Step::LocalInfile)),
                _ => match lenenc_int(p) {
                    Some((n, [])) if n > 0 => more(State::Columns { left: n }),
                    _ => Err(malformed("result set column count")),
                },
            },
            State::Columns { left } => {
                if left > 1 {
                    more(State::Columns { left: left - 1 })
                } else if self.deprecate_eof {
                    more(State::Rows)
                } else {
                    more(State::ColumnsEof)
                }
            }
            State::ColumnsEof => match first {
                Some(0xfe) if p.len() < 9 => {
                    let st = eof_status(p).ok_or(malformed("EOF packet"))?;
                    if st & status::CURSOR_EXISTS != 0 {
                        // A cursor was opened: rows come with COM_STMT_FETCH.
                        self.ended(Completion::rows(Some(0)));
                        done(true)
                    } else {
                        more(State::Rows)
                    }
                }
                Some(0xff) => {
                    self.ended_in_error(p);
                    done(false)
                }
                _ => Err(malformed("EOF after column definitions")),
            },
            // A row can start with 0xFE only as the 8-byte length of a value
            // of 16 MiB or more, so in a packet of 0xFFFFFF bytes.
            State::Rows if long => {
                self.rows += 1;
                more(State::Rows)
            }
            State::Rows => match first {
                Some(0xfe) => {
                    let st = if self.deprecate_eof {
                        ok_status(p)
                    } else {
                        eof_status(p)
                    }
                    .ok_or(malformed("end of rows"))?;
                    self.ended(Completion::rows(Some(self.rows)));
                    if st & status::MORE_RESULTS_EXISTS != 0 {
                        more(State::ResultStart)
                    } else {
                        done(true)
                    }
                }
                Some(0xff) => {
                    self.ended_in_error(p);
                    done(false)
                }
                _ => {
                    self.rows += 1;
                    more(State::Rows)
                }
            },
            State::PrepareStart => match first {
                Some(0x00) => {
                    let ok = prepare_ok(p).ok_or(malformed("COM_STMT_PREPARE_OK"))?;
                    self.prepared = Some(ok);
                    let (params, columns) = (u64::from(ok.params), u64::from(ok.columns));
                    if params > 0 {
                        more(State::PrepDefs {
                            left: params,
                            columns_after: columns,
                        })
                    } else {
                        Ok(self.after_defs(columns))
                    }
                }
                Some(0xff) => done(false),
                _ => Err(malformed("COM_STMT_PREPARE reply")),
            },
            State::PrepDefs {
                left,
                columns_after,
            } => {
                if left > 1 {
                    more(State::PrepDefs {
                        left: left - 1,
                        columns_after,
                    })
                } else if self.deprecate_eof {
                    Ok(self.after_defs(columns_after))
                } else {
                    more(State::PrepEof { columns_after })
                }
            }
            State::PrepEof { columns_after } => match first {
                Some(0xfe) if p.len() < 9 => Ok(self.after_defs(columns_after)),
                _ => Err(malformed("EOF after prepared statement definitions")),
            },
            State::OnePacket => {
                if first == Some(0xff) {
                    self.ended_in_error(p);
                }
                done(first != Some(0xff))
            }
            State::Auth => match (first, p) {
                (Some(0x00), _) => done(true),
                (Some(0xff), _) => done(false),
                // caching_sha2_password's fast path succeeded: the server
                // sends OK next, without waiting for the client.
                (Some(0x01), [_, 0x03]) => more(State::Auth),
                // AuthSwitchRequest, AuthMoreData (public key, full
                // authentication) and other plugins' questions.
                _ => Ok((State::Auth, Step::ClientTurn)),
            },
            State::Done => Err(malformed("packet after the end of a reply")),
        }
    }

    fn after_defs(&self, columns: u64) -> (State, Step) {
        if columns > 0 {
            (
                State::PrepDefs {
                    left: columns,
                    columns_after: 0,
                },
                Step::More,
            )
        } else {
            (State::Done, Step::Done { ok: true })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(status: u16) -> Vec<u8> {
        let mut p = vec![0, 0, 0];
        p.extend_from_slice(&status.to_le_bytes());
        p.extend_from_slice(&[0, 0]);
        p
    }

    fn eof(status: u16) -> Vec<u8> {
        let mut p = vec![0xfe, 0, 0];
        p.extend_from_slice(&status.to_le_bytes());
        p
    }

    fn ok_eof(status: u16) -> Vec<u8> {
        let mut p = ok(status);
        p[0] = 0xfe;
        p
    }

    fn coldef() -> Vec<u8> {
        b"\x03def\x00\x00\x00\x01a\x00\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00".to_vec()
    }

    /// Feeds whole packets (and, before each, every strict prefix, which
    /// must be `NeedMore` or, for streamed packets, already final).
    fn run(reply: &mut Reply, packets: &[Vec<u8>]) -> Vec<Step> {
        let mut steps = Vec::new();
        for p in packets {
            let h = Header {
                len: p.len(),
                seq: reply.next_seq(),
            };
            let step = reply.feed(h, p).unwrap();
            steps.push(step);
        }
        steps
    }

    /// Every strict prefix of a decisive packet is `NeedMore` and changes nothing.
    #[test]
    fn prefixes_of_decisive_packets_need_more() {
        for p in [
            ok(0),
            eof(0),
            vec![0xff, 0x10, 0x04, b'#', b'4'],
            vec![0xfc, 2, 1],
        ] {
            for i in 0..p.len() {
                let mut r = Reply::new(Expect::Results, 1, false);
                let h = Header {
                    len: p.len(),
                    seq: 1,
                };
                assert_eq!(r.feed(h, &p[..i]).unwrap(), Step::NeedMore, "{p:?} {i}");
                assert_eq!(r.next_seq(), 1);
            }
        }
    }

    #[test]
    fn ok_err_and_one_packet() {
        let mut r = Reply::new(Expect::Results, 1, true);
        assert_eq!(run(&mut r, &[ok(2)]), [Step::Done { ok: true }]);
        assert_eq!(r.next_seq(), 2);
        let mut r = Reply::new(Expect::OnePacket, 1, true);
        assert_eq!(
            run(&mut r, &[vec![0xff, 1, 2, b'x']]),
            [Step::Done { ok: false }]
        );
        let mut r = Reply::new(Expect::OnePacket, 1, true);
        assert_eq!(
            run(&mut r, &[b"Uptime: 5  Threads: 1".to_vec()]),
            [Step::Done { ok: true }]
        );
    }

    #[test]
    fn text_result_sets_in_both_eof_modes() {
        // Rows starting with NULL (0xFB) and with a 0xFE-looking byte
        // inside stay rows.
        let rows = [vec![1, b'a'], vec![0xfb], vec![2, 0xfe, 0xfe]];
        let mut classic = vec![vec![1], coldef(), eof(0)];
        classic.extend(rows.iter().cloned());
        classic.push(eof(0));
        let mut r = Reply::new(Expect::Results, 1, false);
        let steps = run(&mut r, &classic);
        assert_eq!(steps.last(), Some(&Step::Done { ok: true }));
        assert!(steps[..steps.len() - 1].iter().all(|s| *s == Step::More));

        let mut modern = vec![vec![1], coldef()];
        modern.extend(rows.iter().cloned());
        modern.push(ok_eof(0));
        let mut r = Reply::new(Expect::Results, 1, true);
        let steps = run(&mut r, &modern);
        assert_eq!(steps.last(), Some(&Step::Done { ok: true }));
        assert!(steps[..steps.len() - 1].iter().all(|s| *s == Step::More));
    }

    #[test]
    fn multiple_results_and_errors_mid_rows() {
        let mut r = Reply::new(Expect::Results, 1, true);
        let steps = run(
            &mut r,
            &[
                ok(status::MORE_RESULTS_EXISTS),
                vec![1],
                coldef(),
                vec![1, b'x'],
                ok_eof(status::MORE_RESULTS_EXISTS),
                vec![0xff, 0x28, 0x04, b'#', b'H', b'Y', b'0', b'0', b'0'],
            ],
        );
        assert_eq!(steps.last(), Some(&Step::Done { ok: false }));
        assert_eq!(steps.iter().filter(|s| **s == Step::More).count(), 5);
        assert!(r.is_done());
        assert!(
            r.feed(
                Header {
                    len: 1,
                    seq: r.next_seq()
                },
                &[0]
            )
            .is_err()
        );
    }

    #[test]
    fn rows_of_16_mib_continue_in_the_next_packet() {
        let mut r = Reply::new(Expect::Rows, 1, true);
        // A row whose first value is 16 MiB long starts with 0xFE.
        let h = Header {
            len: MAX_PACKET,
            seq: 1,
        };
        assert_eq!(r.feed(h, &[0xfe]).unwrap(), Step::More);
        // The continuation's first byte is data, whatever it looks like.
        let h = Header { len: 7, seq: 2 };
        assert_eq!(r.feed(h, &[0xff]).unwrap(), Step::More);
        assert_eq!(run(&mut r, &[ok_eof(0)]), [Step::Done { ok: true }]);
        // A terminator claiming 16 MiB is refused.
        let mut r = Reply::new(Expect::Results, 1, true);
        assert!(
            r.feed(
                Header {
                    len: MAX_PACKET,
                    seq: 1
                },
                &[0]
            )
            .is_err()
        );
    }

    #[test]
    fn cursors_end_after_the_column_definitions() {
        let mut r = Reply::new(Expect::Results, 1, false);
        let steps = run(&mut r, &[vec![1], coldef(), eof(status::CURSOR_EXISTS)]);
        assert_eq!(steps.last(), Some(&Step::Done { ok: true }));
        let mut r = Reply::new(Expect::Results, 1, true);
        let steps = run(&mut r, &[vec![1], coldef(), ok_eof(status::CURSOR_EXISTS)]);
        assert_eq!(steps.last(), Some(&Step::Done { ok: true }));
    }

    fn prepare_ok_packet(id: u32, columns: u16, params: u16) -> Vec<u8> {
        let mut p = vec![0];
        p.extend_from_slice(&id.to_le_bytes());
        p.extend_from_slice(&columns.to_le_bytes());
        p.extend_from_slice(&params.to_le_bytes());
        p.extend_from_slice(&[0, 0, 0]);
        p
    }

    #[test]
    fn prepare_replies() {
        for (cols, params) in [(0u16, 0u16), (2, 0), (0, 3), (2, 3)] {
            for deprecate in [false, true] {
                let mut packets = vec![prepare_ok_packet(7, cols, params)];
                for n in [params, cols] {
                    if n > 0 {
                        packets.extend((0..n).map(|_| coldef()));
                        if !deprecate {
                            packets.push(eof(0));
                        }
                    }
                }
                let mut r = Reply::new(Expect::Prepare, 1, deprecate);
                let steps = run(&mut r, &packets);
                assert_eq!(
                    steps.last(),
                    Some(&Step::Done { ok: true }),
                    "{cols} {params}"
                );
                assert!(steps[..steps.len() - 1].iter().all(|s| *s == Step::More));
                assert_eq!(r.prepared().unwrap().statement_id, 7);
            }
        }
        let mut r = Reply::new(Expect::Prepare, 1, true);
        assert_eq!(
            run(&mut r, &[vec![0xff, 0x28, 0x04, b'x']]),
            [Step::Done { ok: false }]
        );
        assert_eq!(r.prepared(), None);
    }

    #[test]
    fn local_infile_then_ok() {
        let mut r = Reply::new(Expect::Results, 1, true);
        assert_eq!(
            run(&mut r, &[b"\xfb/etc/passwd".to_vec()]),
            [Step::LocalInfile]
        );
        r.client_packet(2).unwrap();
        assert!(r.client_packet(9).is_err());
        r.client_packet(3).unwrap();
        r.resume();
        assert_eq!(run(&mut r, &[ok(0)]), [Step::Done { ok: true }]);
        assert_eq!(r.next_seq(), 5);
    }

    #[test]
    fn authentication_exchanges() {
        // caching_sha2_password fast path: more data 0x03, then OK.
        let mut r = Reply::new(Expect::Auth, 2, true);
        assert_eq!(
            run(&mut r, &[vec![1, 3], ok(2)]),
            [Step::More, Step::Done { ok: true }]
        );
        // Full path: 0x04, client asks for the key, key, client answers, OK.
        let mut r = Reply::new(Expect::Auth, 2, true);
        assert_eq!(run(&mut r, &[vec![1, 4]]), [Step::ClientTurn]);
        r.client_packet(3).unwrap();
        assert_eq!(
            run(&mut r, &[b"\x01-----BEGIN PUBLIC KEY-----".to_vec()]),
            [Step::ClientTurn]
        );
        r.client_packet(5).unwrap();
        assert_eq!(run(&mut r, &[ok(2)]), [Step::Done { ok: true }]);
        // AuthSwitchRequest, answer, ERR.
        let mut r = Reply::new(Expect::Auth, 2, true);
        assert_eq!(
            run(&mut r, &[b"\xfemysql_native_password\0abc".to_vec()]),
            [Step::ClientTurn]
        );
        r.client_packet(3).unwrap();
        assert_eq!(
            run(&mut r, &[vec![0xff, 0x15, 0x04, b'x']]),
            [Step::Done { ok: false }]
        );
    }

    #[test]
    fn wrong_sequence_ids_and_garbage_are_errors() {
        let mut r = Reply::new(Expect::Results, 1, true);
        assert!(matches!(
            r.feed(Header { len: 7, seq: 5 }, &ok(0)),
            Err(CodecError::OutOfOrder {
                expected: 1,
                got: 5
            })
        ));
        let mut r = Reply::new(Expect::Results, 1, true);
        assert!(r.feed(Header { len: 2, seq: 1 }, &[0xfe, 0]).is_err());
        let mut r = Reply::new(Expect::Results, 1, false);
        let steps = run(&mut r, &[vec![1], coldef()]);
        assert_eq!(steps, [Step::More, Step::More]);
        assert!(r.feed(Header { len: 2, seq: 3 }, &[1, b'a']).is_err());
        let mut r = Reply::new(Expect::Prepare, 1, false);
        assert!(r.feed(Header { len: 3, seq: 1 }, &[0, 1, 2]).is_err());
    }

    proptest::proptest! {
        /// Any run of server packets (and client packets in between) is
        /// read or refused, never a panic, in every reply shape.
        #[test]
        fn replies_never_panic(
            packets in proptest::collection::vec(
                (proptest::num::u8::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..24), proptest::bool::ANY),
                0..24,
            ),
            shape in 0usize..5,
            deprecate in proptest::bool::ANY,
        ) {
            let expect = [Expect::OnePacket, Expect::Results, Expect::Rows, Expect::Prepare, Expect::Auth][shape];
            let mut r = Reply::new(expect, 1, deprecate);
            for (seq_delta, payload, long) in packets {
                let seq = if seq_delta < 200 { r.next_seq() } else { seq_delta };
                let len = if long { MAX_PACKET } else { payload.len() };
                match r.feed(Header { len, seq }, &payload) {
                    Ok(Step::LocalInfile) => { let _ = r.client_packet(r.next_seq()); r.resume(); }
                    Ok(Step::ClientTurn) => { let _ = r.client_packet(r.next_seq()); }
                    Ok(Step::Done { .. }) | Err(_) => break,
                    Ok(Step::NeedMore | Step::More) => {}
                }
            }
        }
    }
}
