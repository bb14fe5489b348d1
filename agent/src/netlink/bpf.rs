//! Kernel-side event filter: a classic BPF socket filter, built from a
//! [`Filter`], that drops conntrack events the agent would discard anyway
//! before they cost socket buffer, a `recvmsg` and a decode.
//!
//! The program sees one event message from its `nlmsghdr` on. It relies on
//! the fixed order in which the kernel emits an event:
//!
//! ```text
//!  0 nlmsghdr (16)  type 0x0100 NEW / 0x0102 DELETE
//! 16 nfgenmsg (4)
//! 20 CTA_TUPLE_ORIG          nla_len L, type 1 (|NLA_F_NESTED)
//! 24   CTA_TUPLE_IP          nla_len 20 (IPv4) or 44 (IPv6), type 1
//!  P   CTA_TUPLE_PROTO       P = 24 + 20 or 44, type 2
//! P+4    CTA_PROTO_NUM       nla_len 5, type 1, u8 at P+8
//! P+12   CTA_PROTO_SRC_PORT  nla_len 6, type 2, be16 at P+16
//! P+20   CTA_PROTO_DST_PORT  nla_len 6, type 3, be16 at P+24
//! ```
//!
//! `nla_len`/`nla_type` are in host byte order while BPF loads are
//! big-endian, so constants are converted and lengths that need arithmetic
//! are put together from single bytes; `X` holds `P`.
//!
//! Verdicts, with the same meaning as [`Filter::keeps`]:
//! - not a `NEW`/`DELETE` conntrack message (acks, `NLMSG_DONE` ...): accept;
//! - anything not where the layout above says (length, type, nesting, a
//!   multi-message skb): accept, user space decides (fail open);
//! - protocol not kept, or without ports (ICMP ...): drop;
//! - original destination port not watched (or not matched, see
//!   [`Filter::matches_original`]): with `match: [.., reply]`, the same
//!   port check on the reply tuple's source port (laid out the same way
//!   right after `CTA_TUPLE_ORIG`, see `reply_source_port`), else drop;
//! - otherwise accept.
//!
//! So the program never drops a message that [`super::decode`] decodes into
//! a record the filter keeps; the tests check this with an interpreter
//! ([`run`]) on golden and random messages.

use std::io;
use std::os::fd::RawFd;

use libc::sock_filter;

use crate::filter::Filter;

/// Return value that keeps the whole message.
pub const ACCEPT: u32 = 0xffff_ffff;
/// Return value that drops the message.
pub const DROP: u32 = 0;

/// Above this many disjoint port ranges (half as many with
/// `match: [original, reply]`, which needs two searches) the program skips
/// the port check (accepts every kept protocol) to stay within
/// `BPF_MAXINSNS`.
pub const MAX_PORT_RANGES: usize = 600;

const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

// Scratch memory slots.
const M_LEN: u32 = 0; // skb length
const M_TMP: u32 = 1;
const M_ORIG_END: u32 = 2; // offset just past CTA_TUPLE_ORIG
const M_PROTO: u32 = 3; // P, offset of CTA_TUPLE_PROTO
const M_PROTO_LEN: u32 = 4;
const M_REPLY: u32 = 5; // R, offset of CTA_TUPLE_REPLY
const M_REPLY_PROTO: u32 = 6; // Q, offset of CTA_TUPLE_PROTO in CTA_TUPLE_REPLY

/// Offset of CTA_TUPLE_ORIG and of its first nested attribute.
const ORIG_OFF: u32 = 20;
const IP_OFF: u32 = 24;

/// A 16-bit host-order value as a `BPF_H` load sees it.
const fn h(v: u16) -> u32 {
    u16::from_be_bytes(v.to_ne_bytes()) as u32
}

/// Offsets of the (high, low) byte of a host-order u16 stored at `k`.
const fn host16_bytes(k: u32) -> (u32, u32) {
    if cfg!(target_endian = "little") {
        (k + 1, k)
    } else {
        (k, k + 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Label(usize);

#[derive(Debug, Clone, Copy)]
enum Item {
    Insn(sock_filter),
    /// Conditional jump; `None` means the next instruction.
    Jump {
        code: u16,
        k: u32,
        jt: Option<Label>,
        jf: Option<Label>,
    },
    Ja(Label),
    Bind(Label),
}

/// A tiny assembler: instructions plus forward labels.
#[derive(Debug, Default)]
struct Asm {
    items: Vec<Item>,
    labels: usize,
}

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels += 1;
        Label(self.labels - 1)
    }
    fn bind(&mut self, l: Label) {
        self.items.push(Item::Bind(l));
    }
    fn op(&mut self, code: u32, k: u32) {
        self.items.push(Item::Insn(stmt(code, k)));
    }
    fn jump(&mut self, code: u32, k: u32, jt: Option<Label>, jf: Option<Label>) {
        self.items.push(Item::Jump {
            code: code as u16,
            k,
            jt,
            jf,
        });
    }
    fn ja(&mut self, l: Label) {
        self.items.push(Item::Ja(l));
    }
    fn ret(&mut self, v: u32) {
        self.op(libc::BPF_RET | libc::BPF_K, v);
    }
    /// A = u16 at absolute offset `k`, big-endian load.
    fn ld_h(&mut self, k: u32) {
        self.op(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS, k);
    }
    /// A = u16 at `X + k`.
    fn ld_h_ind(&mut self, k: u32) {
        self.op(libc::BPF_LD | libc::BPF_H | libc::BPF_IND, k);
    }
    /// Continue when the attribute type (flags masked) at A equals `ty`.
    fn expect_type(&mut self, ty: u16, otherwise: Label) {
        self.op(
            libc::BPF_ALU | libc::BPF_AND | libc::BPF_K,
            h(NLA_TYPE_MASK),
        );
        self.jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            h(ty),
            None,
            Some(otherwise),
        );
    }
    /// A = host-order u16 at `k` (or `X + k` when `ind`), as a number.
    /// Clobbers X and M_TMP.
    fn ld_host16(&mut self, k: u32, ind: bool) {
        let mode = if ind { libc::BPF_IND } else { libc::BPF_ABS };
        let (hi, lo) = host16_bytes(k);
        self.op(libc::BPF_LD | libc::BPF_B | mode, lo);
        self.op(libc::BPF_ST, M_TMP);
        self.op(libc::BPF_LD | libc::BPF_B | mode, hi);
        self.op(libc::BPF_ALU | libc::BPF_LSH | libc::BPF_K, 8);
        self.op(libc::BPF_LDX | libc::BPF_MEM, M_TMP);
        self.op(libc::BPF_ALU | libc::BPF_OR | libc::BPF_X, 0);
    }

    /// Resolve labels; `None` when a conditional jump is longer than 255.
    fn finish(&self) -> Option<Vec<sock_filter>> {
        let mut pos = vec![usize::MAX; self.labels];
        let mut n = 0;
        for it in &self.items {
            match it {
                Item::Bind(l) => pos[l.0] = n,
                _ => n += 1,
            }
        }
        let mut out = Vec::with_capacity(n);
        for it in &self.items {
            let here = out.len();
            let rel = |l: Option<Label>| -> Option<usize> {
                match l {
                    None => Some(0),
                    Some(l) => pos[l.0].checked_sub(here + 1),
                }
            };
            match *it {
                Item::Bind(_) => {}
                Item::Insn(i) => out.push(i),
                Item::Jump { code, k, jt, jf } => out.push(sock_filter {
                    code,
                    jt: u8::try_from(rel(jt)?).ok()?,
                    jf: u8::try_from(rel(jf)?).ok()?,
                    k,
                }),
                Item::Ja(l) => out.push(stmt(
                    libc::BPF_JMP | libc::BPF_JA,
                    u32::try_from(rel(Some(l))?).ok()?,
                )),
            }
        }
        Some(out)
    }
}

/// Sorted ports merged into inclusive ranges.
fn port_ranges(ports: &[u16]) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for &p in ports {
        match out.last_mut() {
            Some((_, hi)) if u32::from(*hi) + 1 == u32::from(p) => *hi = p,
            _ => out.push((p, p)),
        }
    }
    out
}

/// Binary search over `ranges` on A; a hit returns [`ACCEPT`], a miss
/// returns [`DROP`] or, with `miss`, jumps there (a `JA`, which has no
/// 255-instruction limit).
fn port_tree(a: &mut Asm, ranges: &[(u16, u16)], miss: Option<Label>) {
    let missed = |a: &mut Asm| match miss {
        Some(l) => a.ja(l),
        None => a.ret(DROP),
    };
    match ranges {
        [] => missed(a),
        [(lo, hi)] if lo == hi => {
            let no = a.label();
            a.jump(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                u32::from(*lo),
                None,
                Some(no),
            );
            a.ret(ACCEPT);
            a.bind(no);
            missed(a);
        }
        [(lo, hi)] => {
            let no = a.label();
            a.jump(
                libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
                u32::from(*lo),
                None,
                Some(no),
            );
            a.jump(
                libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K,
                u32::from(*hi),
                Some(no),
                None,
            );
            a.ret(ACCEPT);
            a.bind(no);
            missed(a);
        }
        _ => {
            let (left, right) = ranges.split_at(ranges.len() / 2);
            let l_left = a.label();
            let l_right = a.label();
            // A >= first port of the right half: go right (through a JA,
            // whose offset has no 255 limit), else fall into the left half.
            a.jump(
                libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
                u32::from(right[0].0),
                None,
                Some(l_left),
            );
            a.ja(l_right);
            a.bind(l_left);
            port_tree(a, left, miss);
            a.bind(l_right);
            port_tree(a, right, miss);
        }
    }
}

/// Load the reply tuple's source port into A, or accept (fail open) when the
/// reply tuple is not laid out as expected:
///
/// ```text
///  R   CTA_TUPLE_REPLY       R = just past CTA_TUPLE_ORIG (4-aligned), type 2
/// R+4    CTA_TUPLE_IP        nla_len 20 (IPv4) or 44 (IPv6), type 1
///  Q     CTA_TUPLE_PROTO     Q = R + 4 + 20 or 44, type 2
/// Q+4      CTA_PROTO_NUM     nla_len 5, type 1
/// Q+12     CTA_PROTO_SRC_PORT nla_len 6, type 2, be16 at Q+16
/// ```
///
/// When the decoder accepts the message, these checks make the port read
/// here the one it reads: the decoder walks the same attributes by length,
/// and any attribute that ran past its parent, repeated, or was missing
/// would be an error there (no record, nothing to keep).
fn reply_source_port(a: &mut Asm) {
    use libc::{
        BPF_ADD, BPF_ALU, BPF_JEQ, BPF_JGT, BPF_JMP, BPF_JSET, BPF_K, BPF_LDX, BPF_LEN, BPF_MEM,
        BPF_MISC, BPF_ST, BPF_TXA, BPF_W, BPF_X,
    };
    let accept = a.label();
    let v4 = a.label();
    let v6 = a.label();
    let proto = a.label();
    let port = a.label();
    // Only slots written in this block are read here: the kernel's linear
    // check may see the tree before it reached through an early accept.
    a.ld_host16(ORIG_OFF, false);
    a.op(BPF_ALU | BPF_ADD | BPF_K, ORIG_OFF);
    a.op(BPF_ST, M_REPLY);
    a.jump(BPF_JMP | BPF_JSET | BPF_K, 3, Some(accept), None);
    a.op(BPF_ALU | BPF_ADD | BPF_K, 8);
    a.op(BPF_LDX | BPF_W | BPF_LEN, 0);
    a.jump(BPF_JMP | BPF_JGT | BPF_X, 0, Some(accept), None);
    a.op(BPF_LDX | BPF_MEM, M_REPLY);
    a.ld_h_ind(2);
    a.expect_type(2, accept);
    a.ld_h_ind(6);
    a.expect_type(1, accept);
    a.ld_h_ind(4);
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, h(20), Some(v4), None);
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, h(44), Some(v6), Some(accept));
    a.bind(v4);
    a.op(BPF_MISC | BPF_TXA, 0);
    a.op(BPF_ALU | BPF_ADD | BPF_K, 4 + 20);
    a.ja(proto);
    a.bind(v6);
    a.op(BPF_MISC | BPF_TXA, 0);
    a.op(BPF_ALU | BPF_ADD | BPF_K, 4 + 44);
    a.bind(proto);
    // A = Q. Everything up to the source port lies inside the skb.
    a.op(BPF_ST, M_REPLY_PROTO);
    a.op(BPF_ALU | BPF_ADD | BPF_K, 18);
    a.op(BPF_LDX | BPF_W | BPF_LEN, 0);
    a.jump(BPF_JMP | BPF_JGT | BPF_X, 0, Some(accept), None);
    a.op(BPF_LDX | BPF_MEM, M_REPLY_PROTO);
    a.ld_h_ind(2);
    a.expect_type(2, accept);
    a.ld_h_ind(4);
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, h(5), None, Some(accept));
    a.ld_h_ind(6);
    a.expect_type(1, accept);
    a.ld_h_ind(12);
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, h(6), None, Some(accept));
    a.ld_h_ind(14);
    a.expect_type(2, accept);
    a.ld_h_ind(16);
    a.ja(port);
    a.bind(accept);
    a.ret(ACCEPT);
    a.bind(port);
}

/// Build the socket filter for `filter`. See the module docs for what it
/// checks; the result always passes the kernel's classic BPF checker.
pub fn build(filter: &Filter) -> Vec<sock_filter> {
    use libc::{
        BPF_ADD, BPF_ALU, BPF_B, BPF_IMM, BPF_IND, BPF_JEQ, BPF_JGE, BPF_JGT, BPF_JMP, BPF_K,
        BPF_LD, BPF_LDX, BPF_LEN, BPF_MEM, BPF_MISC, BPF_ST, BPF_STX, BPF_TXA, BPF_W, BPF_X,
    };
    const CT_NEW: u16 = 0x0100;
    const CT_DELETE: u16 = 0x0102;
    let mut a = Asm::default();
    let accept1 = a.label();
    let type_ok = a.label();
    let v4 = a.label();
    let v6 = a.label();
    let proto = a.label();
    let ports = a.label();
    let tree = a.label();

    // The skb is one message of the expected type, long enough for the
    // fixed-offset reads below.
    a.op(BPF_LD | BPF_W | BPF_LEN, 0);
    a.op(BPF_ST, M_LEN);
    a.jump(BPF_JMP | BPF_JGE | BPF_K, IP_OFF + 4, None, Some(accept1));
    // nlmsg_len < 65536: its two high bytes are zero.
    let len_hi_half = if cfg!(target_endian = "little") { 2 } else { 0 };
    let len_lo_half = if cfg!(target_endian = "little") { 0 } else { 2 };
    a.ld_h(len_hi_half);
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, 0, None, Some(accept1));
    a.ld_host16(len_lo_half, false);
    a.op(BPF_LDX | BPF_MEM, M_LEN);
    a.jump(BPF_JMP | BPF_JEQ | BPF_X, 0, None, Some(accept1));
    a.ld_h(4);
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, h(CT_NEW), Some(type_ok), None);
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, h(CT_DELETE), None, Some(accept1));
    a.bind(type_ok);

    // CTA_TUPLE_ORIG first, CTA_TUPLE_IP first inside it.
    a.ld_h(ORIG_OFF + 2);
    a.expect_type(1, accept1);
    a.ld_h(IP_OFF + 2);
    a.expect_type(1, accept1);
    a.ld_host16(ORIG_OFF, false);
    a.op(BPF_ALU | BPF_ADD | BPF_K, ORIG_OFF);
    a.op(BPF_ST, M_ORIG_END);
    a.ld_h(IP_OFF);
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, h(20), Some(v4), None);
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, h(44), Some(v6), Some(accept1));
    a.bind(v4);
    a.op(BPF_LDX | BPF_W | BPF_IMM, IP_OFF + 20);
    a.ja(proto);
    a.bind(v6);
    a.op(BPF_LDX | BPF_W | BPF_IMM, IP_OFF + 44);
    a.bind(proto);

    // X = P. Everything up to the destination port lies inside the skb.
    a.op(BPF_STX, M_PROTO);
    a.op(BPF_MISC | BPF_TXA, 0);
    a.op(BPF_ALU | BPF_ADD | BPF_K, 26);
    a.op(BPF_LDX | BPF_MEM, M_LEN);
    a.jump(BPF_JMP | BPF_JGT | BPF_X, 0, Some(accept1), None);
    a.op(BPF_LDX | BPF_MEM, M_PROTO);
    a.ld_h_ind(2);
    a.expect_type(2, accept1);
    // CTA_TUPLE_PROTO holds CTA_PROTO_NUM and lies inside CTA_TUPLE_ORIG.
    a.ld_host16(0, true);
    a.op(BPF_ST, M_PROTO_LEN);
    a.jump(BPF_JMP | BPF_JGE | BPF_K, 12, None, Some(accept1));
    a.op(BPF_LDX | BPF_MEM, M_PROTO);
    a.op(BPF_ALU | BPF_ADD | BPF_X, 0);
    a.op(BPF_LDX | BPF_MEM, M_ORIG_END);
    a.jump(BPF_JMP | BPF_JGT | BPF_X, 0, Some(accept1), None);
    a.op(BPF_LDX | BPF_MEM, M_PROTO);
    a.ld_h_ind(4);
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, h(5), None, Some(accept1));
    a.ld_h_ind(6);
    a.expect_type(1, accept1);

    // Protocol kept? (Every kept protocol has ports.)
    a.op(BPF_LD | BPF_B | BPF_IND, 8);
    for p in filter.protocols() {
        a.jump(
            BPF_JMP | BPF_JEQ | BPF_K,
            u32::from(p.number()),
            Some(ports),
            None,
        );
    }
    a.ret(DROP);

    // Source and destination port where expected, inside CTA_TUPLE_PROTO.
    // (The shared accept comes after this block: the kernel's checker walks
    // the program linearly, and a path through an early accept would make
    // M_PROTO_LEN look unwritten here.)
    a.bind(ports);
    a.op(BPF_LD | BPF_MEM, M_PROTO_LEN);
    a.jump(BPF_JMP | BPF_JGE | BPF_K, 28, None, Some(accept1));
    a.ld_h_ind(12);
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, h(6), None, Some(accept1));
    a.ld_h_ind(14);
    a.expect_type(2, accept1);
    a.ld_h_ind(20);
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, h(6), None, Some(accept1));
    a.ld_h_ind(22);
    a.expect_type(3, accept1);
    a.ld_h_ind(24); // the port itself is big-endian: a plain number now
    a.ja(tree);
    a.bind(accept1);
    a.ret(ACCEPT);
    a.bind(tree);
    let ranges = port_ranges(filter.ports());
    // Two trees (original and reply port) share the instruction budget.
    let limit = if filter.matches_original() && filter.matches_reply() {
        MAX_PORT_RANGES / 2
    } else {
        MAX_PORT_RANGES
    };
    if ranges.len() > limit {
        a.ret(ACCEPT);
    } else {
        let reply = a.label();
        let miss = filter.matches_reply().then_some(reply);
        if filter.matches_original() {
            port_tree(&mut a, &ranges, miss);
        } else {
            a.ja(reply);
        }
        if filter.matches_reply() {
            a.bind(reply);
            reply_source_port(&mut a);
            port_tree(&mut a, &ranges, None);
        }
    }

    match a.finish() {
        Some(prog) => prog,
        // Unreachable for any filter (the tests build the extremes); if it
        // ever happened, passing everything keeps the agent correct.
        None => vec![stmt(libc::BPF_RET | libc::BPF_K, ACCEPT)],
    }
}

/// Attach `prog` to the socket `fd` (`SO_ATTACH_FILTER`). The kernel checks
/// the program and refuses it with `EINVAL` when it is malformed.
pub fn attach(fd: RawFd, prog: &[sock_filter]) -> io::Result<()> {
    let len = u16::try_from(prog.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bpf program too long"))?;
    let fprog = libc::sock_fprog {
        len,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: fprog points at `prog`, which outlives the call; the kernel
    // copies the program and does not keep the pointer. The option length is
    // the exact size of `sock_fprog`.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reference interpreter for classic BPF socket filters, following the
/// kernel's semantics (a load outside the packet or a division by zero ends
/// the program with 0). Used by the tests and the fuzz targets to check
/// [`build`] against [`Filter::keeps`]; not on the agent's data path.
pub fn run(prog: &[sock_filter], pkt: &[u8]) -> u32 {
    use libc::*;
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    let load = |off: u32, size: u32| -> Option<u32> {
        let off = off as usize;
        let n = match size {
            BPF_W => 4,
            BPF_H => 2,
            _ => 1,
        };
        let b = pkt.get(off..off.checked_add(n)?)?;
        Some(b.iter().fold(0u32, |acc, &v| (acc << 8) | u32::from(v)))
    };
    while let Some(i) = prog.get(pc) {
        pc += 1;
        let code = u32::from(i.code);
        let k = i.k;
        let src = if code & BPF_X != 0 { x } else { k };
        match code & 0x07 {
            BPF_LD => {
                let v = match code & 0xe0 {
                    BPF_IMM => Some(k),
                    BPF_ABS => load(k, code & 0x18),
                    BPF_IND => load(x.wrapping_add(k), code & 0x18),
                    BPF_MEM => mem.get(k as usize).copied(),
                    BPF_LEN => Some(pkt.len() as u32),
                    _ => None,
                };
                match v {
                    Some(v) => a = v,
                    None => return 0,
                }
            }
            BPF_LDX => {
                let v = match code & 0xe0 {
                    BPF_IMM => Some(k),
                    BPF_MEM => mem.get(k as usize).copied(),
                    BPF_LEN => Some(pkt.len() as u32),
                    BPF_MSH => load(k, BPF_B).map(|b| (b & 0xf) << 2),
                    _ => None,
                };
                match v {
                    Some(v) => x = v,
                    None => return 0,
                }
            }
            BPF_ST | BPF_STX => {
                let v = if code & 0x07 == BPF_ST { a } else { x };
                match mem.get_mut(k as usize) {
                    Some(m) => *m = v,
                    None => return 0,
                }
            }
            BPF_ALU => {
                a = match code & 0xf0 {
                    BPF_ADD => a.wrapping_add(src),
                    BPF_SUB => a.wrapping_sub(src),
                    BPF_MUL => a.wrapping_mul(src),
                    BPF_DIV if src == 0 => return 0,
                    BPF_DIV => a / src,
                    BPF_MOD if src == 0 => return 0,
                    BPF_MOD => a % src,
                    BPF_OR => a | src,
                    BPF_AND => a & src,
                    BPF_XOR => a ^ src,
                    BPF_LSH => a.checked_shl(src).unwrap_or(0),
                    BPF_RSH => a.checked_shr(src).unwrap_or(0),
                    BPF_NEG => a.wrapping_neg(),
                    _ => return 0,
                }
            }
            BPF_JMP => {
                let op = code & 0xf0;
                if op == BPF_JA {
                    pc = pc.saturating_add(k as usize);
                    continue;
                }
                let taken = match op {
                    BPF_JEQ => a == src,
                    BPF_JGT => a > src,
                    BPF_JGE => a >= src,
                    BPF_JSET => a & src != 0,
                    _ => return 0,
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
            BPF_RET => return if code & 0x18 == BPF_A { a } else { k },
            BPF_MISC => {
                if code & 0xf8 == BPF_TXA {
                    a = x;
                } else {
                    x = a;
                }
            }
            _ => return 0,
        }
    }
    0
}

/// The checks the kernel's classic BPF checker (`bpf_check_classic`) makes
/// on a socket filter: length, a return at the end, jump targets inside the
/// program, scratch slots and shift amounts in range, no division by a zero
/// constant, and no scratch slot read before it is written. The last check
/// is the kernel's own linear pass, which also lets a return "fall through"
/// to the next instruction, so a slot written on every path to a label can
/// still be refused when a return precedes that label.
pub fn check(prog: &[sock_filter]) -> Result<(), &'static str> {
    use libc::*;
    let n = prog.len();
    if n == 0 || n > BPF_MAXINSNS as usize {
        return Err("program length outside 1..=4096");
    }
    match prog.last() {
        Some(i) if u32::from(i.code) & 0x07 == BPF_RET => {}
        _ => return Err("last instruction is not a return"),
    }
    for (pc, i) in prog.iter().enumerate() {
        let code = u32::from(i.code);
        let class = code & 0x07;
        let mem = matches!(class, BPF_LD | BPF_LDX) && code & 0xe0 == BPF_MEM;
        if (mem || matches!(class, BPF_ST | BPF_STX)) && i.k >= BPF_MEMWORDS as u32 {
            return Err("scratch slot out of range");
        }
        if class == BPF_ALU && code & BPF_X == 0 {
            match code & 0xf0 {
                BPF_DIV | BPF_MOD if i.k == 0 => return Err("division by zero"),
                BPF_LSH | BPF_RSH if i.k >= 32 => return Err("shift out of range"),
                _ => {}
            }
        }
        if class == BPF_JMP {
            let rest = n - pc - 1;
            if code & 0xf0 == BPF_JA {
                if i.k as usize >= rest {
                    return Err("jump out of range");
                }
            } else if usize::from(i.jt) >= rest || usize::from(i.jf) >= rest {
                return Err("jump out of range");
            }
        }
    }
    // check_load_and_stores()
    let mut masks = vec![u16::MAX; n];
    let mut valid: u16 = 0;
    for (pc, i) in prog.iter().enumerate() {
        valid &= masks[pc];
        let code = u32::from(i.code);
        let class = code & 0x07;
        match class {
            BPF_ST | BPF_STX => valid |= 1 << i.k,
            BPF_LD | BPF_LDX if code & 0xe0 == BPF_MEM && valid & (1 << i.k) == 0 => {
                return Err("scratch slot read before written");
            }
            BPF_JMP if code & 0xf0 == BPF_JA => {
                masks[pc + 1 + i.k as usize] &= valid;
                valid = u16::MAX;
            }
            BPF_JMP => {
                masks[pc + 1 + usize::from(i.jt)] &= valid;
                masks[pc + 1 + usize::from(i.jf)] &= valid;
                valid = u16::MAX;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::filter::Match;
    use crate::netlink::decode::testutil::*;
    use crate::netlink::decode::{self, Decoded};
    use ctw_common::Protocol;

    fn verdict(prog: &[sock_filter], pkt: &[u8]) -> u32 {
        let v = run(prog, pkt);
        assert!(v == ACCEPT || v == DROP, "unexpected return {v:#x}");
        v
    }

    /// What user space does with the datagram: does any message in it
    /// decode into a record that the filter keeps?
    fn user_space_keeps(f: &Filter, pkt: &[u8]) -> bool {
        decode::messages(pkt).any(|m| {
            matches!(m.and_then(|m| decode::decode(&m, 0)), Ok(Decoded::Conn(r)) if f.keeps(&r))
        })
    }

    fn random_filter(rng: &mut Rng) -> Filter {
        let n = rng.pick(&[0usize, 1, 2, 5, 20, 300]);
        let mut ports: Vec<u16> = (0..n)
            .map(|_| {
                if rng.chance(50) {
                    rng.pick(&[22, 53, 80, 443, 3306, 5353, 8080, 8443, 40001, 65535, 0])
                } else {
                    rng.next() as u16
                }
            })
            .collect();
        if rng.chance(20) {
            let lo = rng.next() as u16 & 0xff00;
            ports.extend(lo..=lo.saturating_add(rng.below(200) as u16));
        }
        let mut protos: Vec<Protocol> = Protocol::ALL
            .into_iter()
            .filter(|_| rng.chance(40))
            .collect();
        if rng.chance(30) {
            protos.clear(); // all of them
        }
        let on = rng.pick(&[
            &[][..],
            &[Match::Original],
            &[Match::Original, Match::Reply],
            &[Match::Reply],
        ]);
        Filter::new(&ports, &protos).with_match(on)
    }

    fn assert_valid(prog: &[sock_filter]) {
        assert_eq!(check(prog), Ok(()));
        assert!(prog.len() > 1, "label resolution fell back to accept-all");
    }

    #[test]
    fn programs_pass_the_checker_for_extreme_filters() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let even: Vec<u16> = (0..=u16::MAX).step_by(2).collect();
        let at_limit: Vec<u16> = (0..MAX_PORT_RANGES as u16).map(|i| i * 3).collect();
        let over: Vec<u16> = (0..=MAX_PORT_RANGES as u16).map(|i| i * 3).collect();
        for ports in [&[][..], &[80], &[80, 443], &all, &even, &at_limit, &over] {
            for protos in [&[][..], &[Protocol::Udp]] {
                for on in [
                    &[Match::Original][..],
                    &[Match::Original, Match::Reply],
                    &[Match::Reply],
                ] {
                    let prog = build(&Filter::new(ports, protos).with_match(on));
                    assert_valid(&prog);
                }
            }
        }
        for on in [
            &[Match::Original][..],
            &[Match::Original, Match::Reply],
            &[Match::Reply],
        ] {
            let prog = build(&Filter::new(&at_limit, &[]).with_match(on));
            assert!(prog.len() <= libc::BPF_MAXINSNS as usize);
        }
        let half = &at_limit[..at_limit.len() / 2];
        let prog = build(&Filter::new(half, &[]).with_match(&[Match::Original, Match::Reply]));
        assert_valid(&prog);
        assert!(prog.len() > 2 * half.len(), "both trees built");
        assert!(prog.len() <= libc::BPF_MAXINSNS as usize);
        let mut rng = Rng::seeded(3);
        for _ in 0..200 {
            assert_valid(&build(&random_filter(&mut rng)));
        }
    }

    #[test]
    fn golden_verdicts_equal_filter_keeps() {
        let golden = all_golden();
        let mut rng = Rng::seeded(11);
        let mut filters = vec![
            Filter::new(&[8080], &[]),
            Filter::new(&[8080], &[Protocol::Udp]),
            Filter::new(&[5353], &[Protocol::Udp]),
            Filter::new(&[80, 443], &[]),
            Filter::new(&[], &[]),
            Filter::new(&(5000..9000).collect::<Vec<_>>(), &[]),
            Filter::new(&[8080], &[]).with_match(&[Match::Reply]),
            Filter::new(&[5353, 9], &[]).with_match(&[Match::Original, Match::Reply]),
        ];
        filters.extend((0..200).map(|_| random_filter(&mut rng)));
        let (mut kept, mut dropped) = (0, 0);
        for f in &filters {
            let prog = build(f);
            for (name, recv_ns, pkt) in &golden {
                let m = decode::messages(pkt).next().unwrap().unwrap();
                let want = match decode::decode(&m, *recv_ns).unwrap() {
                    Decoded::Conn(r) => f.keeps(&r),
                    Decoded::NoPorts => false,
                    other => panic!("{name}: {other:?}"),
                };
                let got = verdict(&prog, pkt) == ACCEPT;
                assert_eq!(got, want, "{name} with {f:?}");
                if got {
                    kept += 1;
                } else {
                    dropped += 1;
                }
            }
        }
        assert!(kept > 0 && dropped > 0);
        // The obvious cases by name.
        let f = Filter::new(&[8080], &[Protocol::Tcp]);
        let prog = build(&f);
        for (name, _, pkt) in &golden {
            let want = name.contains("tcp");
            assert_eq!(verdict(&prog, pkt) == ACCEPT, want, "{name}");
        }
    }

    #[test]
    fn random_events_verdicts_equal_filter_keeps() {
        let mut rng = Rng::seeded(0xc0ff_ee00_1234_5678);
        for _ in 0..300 {
            let f = random_filter(&mut rng);
            let prog = build(&f);
            for _ in 0..50 {
                let pkt = random_event(&mut rng);
                let m = decode::messages(&pkt).next().unwrap().unwrap();
                let want = match decode::decode(&m, 0).unwrap() {
                    Decoded::Conn(r) => f.keeps(&r),
                    Decoded::NoPorts => false,
                    other => panic!("{other:?}"),
                };
                assert_eq!(verdict(&prog, &pkt) == ACCEPT, want, "{f:?} {pkt:02x?}");
            }
        }
    }

    #[test]
    fn never_drops_what_user_space_keeps() {
        let mut rng = Rng::seeded(0x5eed);
        let golden: Vec<Vec<u8>> = all_golden().into_iter().map(|g| g.2).collect();
        let (mut checked, mut kept) = (0u32, 0u32);
        for _ in 0..200 {
            let f = random_filter(&mut rng);
            let prog = build(&f);
            for i in 0..200 {
                let base = if i % 4 == 0 {
                    rng.pick(&golden.iter().collect::<Vec<_>>()).clone()
                } else {
                    random_event(&mut rng)
                };
                let pkt = mutate(&mut rng, &base);
                checked += 1;
                if user_space_keeps(&f, &pkt) {
                    kept += 1;
                    assert_eq!(verdict(&prog, &pkt), ACCEPT, "{f:?} {pkt:02x?}");
                } else {
                    let _ = verdict(&prog, &pkt);
                }
            }
        }
        // Enough kept events for the property to bite (about 1.9% with
        // this seed: the mutations break most messages, by design).
        assert!(
            kept > checked / 100,
            "{kept} of {checked}: mutations too destructive"
        );
    }

    /// The checked-in fuzz seeds (golden datagrams, truncated and mutated
    /// copies) hold the invariant the `bpf_verdict` fuzz target checks,
    /// without needing a fuzzing toolchain.
    #[test]
    fn fuzz_seeds_never_dropped_when_kept() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/decode");
        let mut rng = Rng::seeded(0xf022);
        let mut filters: Vec<Filter> = (0..40).map(|_| random_filter(&mut rng)).collect();
        filters.push(Filter::new(&[8080, 5353], &[]).with_match(&[Match::Original, Match::Reply]));
        filters.push(Filter::new(&[8080], &[Protocol::Tcp]).with_match(&[Match::Reply]));
        let progs: Vec<_> = filters.iter().map(|f| (f, build(f))).collect();
        let mut seeds = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let pkt = std::fs::read(e.unwrap().path()).unwrap();
            seeds += 1;
            for (f, prog) in &progs {
                if user_space_keeps(f, &pkt) {
                    assert_eq!(verdict(prog, &pkt), ACCEPT, "{f:?} {pkt:02x?}");
                } else {
                    let _ = verdict(prog, &pkt);
                }
            }
        }
        assert!(seeds >= 60, "{seeds} seeds in {}", dir.display());
    }

    #[test]
    fn every_port_against_the_port_tree() {
        let mut rng = Rng::seeded(99);
        let template = golden("udp4")[0].1.clone();
        // The destination port of the golden IPv4 event sits at P + 24 = 68.
        assert_eq!(u16::from_be_bytes([template[68], template[69]]), 5353);
        for _ in 0..6 {
            let f = random_filter(&mut rng);
            let f = Filter::new(f.ports(), &[Protocol::Udp]);
            let prog = build(&f);
            let mut pkt = template.clone();
            for port in 0..=u16::MAX {
                pkt[68..70].copy_from_slice(&port.to_be_bytes());
                assert_eq!(
                    verdict(&prog, &pkt) == ACCEPT,
                    f.keeps_port(port),
                    "port {port} {f:?}"
                );
            }
        }
        // Above MAX_PORT_RANGES the port check is skipped: fail open.
        let many: Vec<u16> = (0..=MAX_PORT_RANGES as u16).map(|i| i * 3).collect();
        let prog = build(&Filter::new(&many, &[Protocol::Udp]));
        let mut pkt = template.clone();
        pkt[68..70].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(verdict(&prog, &pkt), ACCEPT);
        let prog = build(&Filter::new(&many, &[Protocol::Tcp]));
        assert_eq!(
            verdict(&prog, &pkt),
            DROP,
            "the protocol check still applies"
        );
    }

    #[test]
    fn every_reply_port_against_the_port_tree() {
        let mut rng = Rng::seeded(98);
        let template = golden("udp4")[0].1.clone();
        // CTA_TUPLE_ORIG is 52 bytes: the reply tuple starts at 72, its
        // CTA_TUPLE_PROTO at 96 and the reply source port at 96 + 16.
        assert_eq!(u16::from_be_bytes([template[112], template[113]]), 5353);
        // Make the original destination port one no filter below watches.
        let mut base = template.clone();
        base[68..70].copy_from_slice(&7u16.to_be_bytes());
        for _ in 0..4 {
            let f = random_filter(&mut rng);
            let ports: Vec<u16> = f.ports().iter().copied().filter(|&p| p != 7).collect();
            for on in [&[Match::Original, Match::Reply][..], &[Match::Reply]] {
                let f = Filter::new(&ports, &[Protocol::Udp]).with_match(on);
                let prog = build(&f);
                let mut pkt = base.clone();
                for port in 0..=u16::MAX {
                    pkt[112..114].copy_from_slice(&port.to_be_bytes());
                    assert_eq!(
                        verdict(&prog, &pkt) == ACCEPT,
                        f.keeps_port(port),
                        "reply port {port} {f:?}"
                    );
                }
            }
            // Default match: the reply port never makes a record kept.
            let prog = build(&Filter::new(&ports, &[Protocol::Udp]));
            let mut pkt = base.clone();
            for port in [80u16, 5353, 8080] {
                pkt[112..114].copy_from_slice(&port.to_be_bytes());
                assert_eq!(verdict(&prog, &pkt), DROP, "{port}");
            }
        }
    }

    /// A NodePort connection the way the kernel reports it: the original
    /// destination is the node port, the reply source the backend's port.
    #[test]
    fn nodeport_dnat_is_kept_with_reply_match_only() {
        for (client, node, backend, snat) in [
            ("198.18.9.9", "198.18.0.1", "198.19.0.2", "198.19.0.1"),
            (
                "fd00:198:18:9::9",
                "fd00:198:18::1",
                "fd00:198:19::2",
                "fd00:198:19::1",
            ),
        ] {
            let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
            let mut b = Builder::new(decode::CT_NEW, decode::NLM_F_CREATE, 2);
            b.tuple(
                decode::CTA_TUPLE_ORIG,
                ip(client),
                ip(node),
                6,
                Some((40000, 30080)),
            );
            b.tuple(
                decode::CTA_TUPLE_REPLY,
                ip(backend),
                ip(snat),
                6,
                Some((80, 40000)),
            );
            b.attr(decode::CTA_STATUS, &0x1b8u32.to_be_bytes());
            let pkt = b.finish();
            let seed = Filter::new(&[80], &[]);
            let both = Filter::new(&[80], &[]).with_match(&[Match::Original, Match::Reply]);
            assert_eq!(verdict(&build(&seed), &pkt), DROP, "{client}");
            assert_eq!(verdict(&build(&both), &pkt), ACCEPT, "{client}");
            assert!(user_space_keeps(&both, &pkt) && !user_space_keeps(&seed, &pkt));
            let f = Filter::new(&[30080], &[]).with_match(&[Match::Reply]);
            assert_eq!(verdict(&build(&f), &pkt), DROP, "{client}");
        }
    }

    #[test]
    fn other_messages_and_layouts_are_accepted() {
        let prog = build(&Filter::new(&[1], &[Protocol::Sctp]));
        let g = golden("tcp4");
        assert_eq!(verdict(&prog, &g[0].1), DROP);
        let mut b = Builder::new(decode::NLMSG_ERROR, 0, 0);
        b.buf.extend_from_slice(&[0; 20]);
        assert_eq!(verdict(&prog, &b.finish()), ACCEPT);
        assert_eq!(
            verdict(&prog, &Builder::new(decode::NLMSG_DONE, 2, 0).finish()),
            ACCEPT
        );
        assert_eq!(verdict(&prog, &[]), ACCEPT);
        assert_eq!(verdict(&prog, &g[0].1[..30]), ACCEPT, "short skb");
        // A dump answer: several messages in one skb.
        let mut two = g[0].1.clone();
        two.extend_from_slice(&g[1].1);
        assert_eq!(verdict(&prog, &two), ACCEPT);
        // Reply tuple first instead of orig.
        let mut b = Builder::new(decode::CT_NEW, decode::NLM_F_CREATE, 2);
        let (a, c) = ("198.18.0.2".parse().unwrap(), "198.19.0.2".parse().unwrap());
        b.tuple(decode::CTA_TUPLE_REPLY, c, a, 6, Some((80, 5)));
        b.tuple(decode::CTA_TUPLE_ORIG, a, c, 6, Some((5, 80)));
        assert_eq!(verdict(&prog, &b.finish()), ACCEPT);
        // A GET request / unknown ctnetlink type.
        let mut pkt = g[0].1.clone();
        pkt[4] = 1;
        assert_eq!(verdict(&prog, &pkt), ACCEPT);
    }

    #[test]
    fn interpreter_basics() {
        let s = |code: u32, k: u32| stmt(code, k);
        use libc::*;
        // Out-of-bounds load: 0.
        assert_eq!(
            run(
                &[s(BPF_LD | BPF_W | BPF_ABS, 0), s(BPF_RET | BPF_A, 0)],
                &[1, 2]
            ),
            0
        );
        assert_eq!(
            run(
                &[s(BPF_LD | BPF_H | BPF_ABS, 0), s(BPF_RET | BPF_A, 0)],
                &[1, 2]
            ),
            0x0102
        );
        // Division by zero: 0.
        assert_eq!(
            run(
                &[
                    s(BPF_LD | BPF_IMM, 5),
                    s(BPF_ALU | BPF_DIV | BPF_K, 0),
                    s(BPF_RET | BPF_K, 9)
                ],
                &[]
            ),
            0
        );
        assert_eq!(
            check(&[s(BPF_LD | BPF_MEM, 3), s(BPF_RET | BPF_A, 0)]),
            Err("scratch slot read before written")
        );
        assert_eq!(
            check(&[s(BPF_JMP | BPF_JA, 5), s(BPF_RET | BPF_A, 0)]),
            Err("jump out of range")
        );
        assert_eq!(
            check(&[s(BPF_LD | BPF_IMM, 3)]),
            Err("last instruction is not a return")
        );
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn netfilter_socket() -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2) call; the returned fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn kernel_accepts_the_programs() {
        use std::os::fd::AsRawFd;
        if !is_root() {
            println!("skipped: attaching to a NETLINK_NETFILTER socket needs root");
            return;
        }
        let sock = netfilter_socket();
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let at_limit: Vec<u16> = (0..MAX_PORT_RANGES as u16).map(|i| i * 3).collect();
        for f in [
            Filter::new(&[80, 443], &[]),
            Filter::new(&[80, 443], &[]).with_match(&[Match::Original, Match::Reply]),
            Filter::new(&all, &[]).with_match(&[Match::Reply]),
            Filter::new(&[], &[Protocol::Udp]),
            Filter::new(&all, &[]),
            Filter::new(&at_limit, &[]),
        ] {
            let prog = build(&f);
            attach(sock.as_raw_fd(), &prog).unwrap_or_else(|e| panic!("{f:?}: {e}"));
        }
        // The kernel does check: a jump past the end is refused.
        let bad = [
            stmt(libc::BPF_JMP | libc::BPF_JA, 3),
            stmt(libc::BPF_RET | libc::BPF_K, 0),
        ];
        let err = attach(sock.as_raw_fd(), &bad).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    /// Deletes a network namespace when dropped.
    struct Netns(String);

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    fn sh(args: &[&str]) {
        let st = std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
    }

    /// In a namespace of its own: four UDP flows, the filter keeps two;
    /// only their NEW events reach the socket.
    #[test]
    fn kernel_filters_real_events() {
        use std::os::fd::AsRawFd;
        if !is_root() {
            println!("skipped: network namespaces and ctnetlink need root");
            return;
        }
        let ns = Netns(format!(
            "ctwbpf{}x{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        ));
        sh(&["ip", "netns", "add", &ns.0]);
        sh(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "-n",
            &ns.0,
            "addr",
            "add",
            "198.18.0.1/32",
            "dev",
            "lo",
        ]);
        // A conntrack-using rule makes the namespace track connections.
        sh(&["ip", "netns", "exec", &ns.0, "nft", "add table inet ctwbpf { chain out { type filter hook output priority 0; ct state new accept; }; }"]);
        let path = format!("/run/netns/{}", ns.0);
        let kept_port = 8080u16;
        let events = std::thread::spawn(move || -> Vec<Vec<u8>> {
            let nsf = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a valid namespace fd.
            assert_eq!(
                unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let sock = netfilter_socket();
            let fd = sock.as_raw_fd();
            // SAFETY: a zeroed sockaddr_nl with the family set asks for an
            // automatic port id; the length is its exact size.
            unsafe {
                let mut sa: libc::sockaddr_nl = std::mem::zeroed();
                sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
                assert_eq!(
                    libc::bind(
                        fd,
                        (&sa as *const libc::sockaddr_nl).cast(),
                        std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t
                    ),
                    0
                );
            }
            let f = Filter::new(&[5353, kept_port], &[Protocol::Udp]);
            attach(fd, &build(&f)).unwrap();
            let group: libc::c_int = 1; // NFNLGRP_CONNTRACK_NEW
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            // SAFETY: valid fd, option values of the exact sizes given.
            unsafe {
                assert_eq!(
                    libc::setsockopt(
                        fd,
                        libc::SOL_NETLINK,
                        libc::NETLINK_ADD_MEMBERSHIP,
                        (&group as *const libc::c_int).cast(),
                        4
                    ),
                    0
                );
                assert_eq!(
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&tv as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as libc::socklen_t
                    ),
                    0
                );
            }
            let udp = std::net::UdpSocket::bind("198.18.0.1:0").unwrap();
            // The kept flow goes last: events arrive in order, so once its
            // event is read every earlier event that passed has been too.
            for port in [5353, 9090, 80, kept_port] {
                udp.send_to(b"ctw", ("198.18.0.1", port)).unwrap();
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let mut got = Vec::new();
            let mut buf = [0u8; 8192];
            while std::time::Instant::now() < deadline {
                // SAFETY: buf is valid for its length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n <= 0 {
                    continue;
                }
                let d = buf[..n as usize].to_vec();
                let done = decode::messages(&d).any(|m| {
                    matches!(m.and_then(|m| decode::decode(&m, 0)),
                        Ok(Decoded::Conn(r)) if r.orig.dst_port == kept_port)
                });
                got.push(d);
                if done {
                    break;
                }
            }
            got
        });
        let got = events.join().unwrap();
        let dst_ports: Vec<u16> = got
            .iter()
            .flat_map(|d| decode::messages(d).collect::<Vec<_>>())
            .map(|m| match decode::decode(&m.unwrap(), 0).unwrap() {
                Decoded::Conn(r) => r.orig.dst_port,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            dst_ports,
            vec![5353, kept_port],
            "only the watched flows pass the filter"
        );
    }
}
