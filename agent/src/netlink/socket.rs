//! Netlink sockets: the event socket (multicast groups, large receive buffer,
//! batched `recvmmsg`) and the request socket (GET and dump).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// `NFNLGRP_CONNTRACK_NEW`.
pub const GROUP_NEW: u32 = 1;
/// `NFNLGRP_CONNTRACK_DESTROY`. (`NFNLGRP_CONNTRACK_UPDATE` = 2 is never joined.)
pub const GROUP_DESTROY: u32 = 3;

/// Room for one event datagram. Events are 150-400 bytes; longer ones are
/// reported truncated (`MSG_TRUNC`) and counted as malformed.
const SLOT: usize = 2048;

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `SO_RCVTIMEO` on socket `fd`: a blocking receive returns `EAGAIN` after
/// `d` (microsecond resolution; zero waits forever, see socket(7)).
pub fn set_recv_timeout(fd: RawFd, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: passes a pointer to a live timeval and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Inode of a socket, the key of its line in `/proc/net/netlink`.
fn inode_of(fd: RawFd) -> u64 {
    // SAFETY: fstat writes into a zeroed, properly sized stat struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstat(fd, &mut st) };
    if rc < 0 {
        0
    } else {
        st.st_ino
    }
}

/// What one `recv_batch` call saw.
#[derive(Debug)]
pub enum RecvOutcome {
    /// `n` datagrams are ready in the slots.
    Batch(usize),
    /// The receive timeout passed with nothing to read.
    Idle,
    /// The kernel dropped events: the socket overflowed.
    Overflow,
}

/// The subscribed event socket.
pub struct EventSocket {
    sock: Socket,
    inode: u64,
    rcvbuf: usize,
    bufs: Vec<u8>,
    lens: Vec<usize>,
    truncated: Vec<bool>,
    batch: usize,
}

impl std::fmt::Debug for EventSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSocket")
            .field("inode", &self.inode)
            .field("rcvbuf", &self.rcvbuf)
            .finish()
    }
}

impl EventSocket {
    /// Open a NETLINK_NETFILTER socket, force its receive buffer to
    /// `rcvbuf_bytes` (needs CAP_NET_ADMIN) and join `groups`.
    pub fn open(groups: &[u32], rcvbuf_bytes: usize, batch: usize) -> io::Result<EventSocket> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind(&SocketAddr::new(0, 0))?;
        let fd = sock.as_raw_fd();
        let want = rcvbuf_bytes.min(i32::MAX as usize) as libc::c_int;
        // SO_RCVBUFFORCE ignores rmem_max; the kernel doubles the value.
        if let Err(e) = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, want) {
            if e.raw_os_error() == Some(libc::EPERM) {
                return Err(io::Error::new(
                    e.kind(),
                    "SO_RCVBUFFORCE refused: the agent needs CAP_NET_ADMIN",
                ));
            }
            return Err(e);
        }
        for &g in groups {
            sock.add_membership(g)?;
        }
        set_recv_timeout(fd, Duration::from_millis(500))?;
        let rcvbuf = sock.get_rx_buf_sz().unwrap_or(0);
        Ok(EventSocket {
            inode: inode_of(fd),
            rcvbuf,
            bufs: vec![0u8; SLOT * batch],
            lens: vec![0; batch],
            truncated: vec![false; batch],
            batch,
            sock,
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Inode, for `/proc/net/netlink`.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Receive buffer size the kernel granted (bytes).
    pub fn rcvbuf(&self) -> usize {
        self.rcvbuf
    }

    /// Read up to `batch` datagrams with one `recvmmsg`; waits for the first
    /// one at most the receive timeout.
    pub fn recv_batch(&mut self) -> io::Result<RecvOutcome> {
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(self.batch);
        for chunk in self.bufs.chunks_mut(SLOT) {
            iovs.push(libc::iovec {
                iov_base: chunk.as_mut_ptr() as *mut libc::c_void,
                iov_len: SLOT,
            });
        }
        // SAFETY: zeroed mmsghdr is a valid "no name, no control" header.
        let mut hdrs: Vec<libc::mmsghdr> = (0..self.batch)
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for (h, iov) in hdrs.iter_mut().zip(iovs.iter_mut()) {
            h.msg_hdr.msg_iov = iov as *mut libc::iovec;
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at one live iovec over a SLOT-sized
        // region of `self.bufs`, which outlives the call.
        let n = unsafe {
            libc::recvmmsg(
                self.sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                self.batch as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOBUFS) => Ok(RecvOutcome::Overflow),
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(RecvOutcome::Idle),
                _ => Err(e),
            };
        }
        let n = n as usize;
        for (i, h) in hdrs.iter().take(n).enumerate() {
            self.lens[i] = (h.msg_len as usize).min(SLOT);
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        Ok(RecvOutcome::Batch(n))
    }

    /// Datagram `i` of the last batch, and whether it was truncated.
    pub fn datagram(&self, i: usize) -> (&[u8], bool) {
        let start = i * SLOT;
        (&self.bufs[start..start + self.lens[i]], self.truncated[i])
    }
}

/// A socket for requests: GET one entry, or dump the table.
pub struct RequestSocket {
    sock: Socket,
    buf: Vec<u8>,
}

impl std::fmt::Debug for RequestSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSocket").finish()
    }
}

impl RequestSocket {
    pub fn open(timeout: Duration) -> io::Result<RequestSocket> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        set_recv_timeout(sock.as_raw_fd(), timeout)?;
        Ok(RequestSocket {
            sock,
            buf: vec![0u8; 256 * 1024],
        })
    }

    pub fn send(&self, req: &[u8]) -> io::Result<()> {
        self.sock.send(req, 0).map(|_| ())
    }

    /// Receive one datagram (may hold many messages); an EAGAIN is a timeout.
    pub fn recv(&mut self) -> io::Result<&[u8]> {
        let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
        Ok(&self.buf[..n])
    }
}
