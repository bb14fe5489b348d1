//! `rttproxy LISTEN UPSTREAM DELAY_MS`: a TCP proxy that holds every chunk
//! DELAY_MS before forwarding it, in both directions, so a loopback
//! connection through it sees a round trip of 2 x DELAY_MS (this kernel has
//! no netem). Bandwidth is not limited; ordering is kept. For benchmarks only.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

type Queue = Arc<(Mutex<(VecDeque<(Instant, Vec<u8>)>, bool)>, Condvar)>;

fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let q: Queue = Arc::new((Mutex::new((VecDeque::new(), false)), Condvar::new()));
    let writer_q = q.clone();
    let writer = std::thread::spawn(move || {
        let (lock, cv) = &*writer_q;
        loop {
            let item = {
                let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(front) = g.0.pop_front() {
                        break Some(front);
                    }
                    if g.1 {
                        break None;
                    }
                    g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            };
            let Some((due, data)) = item else { break };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let (lock, cv) = &*q;
                lock.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .0
                    .push_back((Instant::now() + delay, buf[..n].to_vec()));
                cv.notify_one();
            }
        }
    }
    let (lock, cv) = &*q;
    lock.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
    cv.notify_one();
    let _ = writer.join();
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, delay_ms] = args.as_slice() else {
        anyhow::bail!("usage: rttproxy LISTEN UPSTREAM DELAY_MS");
    };
    let delay = Duration::from_millis(delay_ms.parse()?);
    let listener = TcpListener::bind(listen)?;
    eprintln!("rttproxy {listen} -> {upstream}, {delay:?} each way");
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let Ok(server) = TcpStream::connect(upstream) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (c2, s2) = (client.try_clone()?, server.try_clone()?);
        std::thread::spawn(move || pump(client, server, delay));
        std::thread::spawn(move || pump(s2, c2, delay));
    }
    Ok(())
}
