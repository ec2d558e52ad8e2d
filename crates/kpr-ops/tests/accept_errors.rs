//! Out of file descriptors, a server's accept loop pauses instead of spinning, and serves again
//! once descriptors are free. A test binary of its own: it lowers the process's RLIMIT_NOFILE.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use kpr_ops::health::HealthModel;
use kpr_ops::listen::{Connections, Limits};
use kpr_ops::server::Health;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime};

/// CPU time of the whole process so far (a clock read: no file descriptor needed).
fn cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap(),
        u32::try_from(t.tv_nsec).unwrap(),
    )
}

#[test]
fn out_of_file_descriptors_the_accept_loop_pauses_and_recovers() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let conns = Connections::new(100);
    let limits = Limits {
        connections: conns.clone(),
        ..Limits::health()
    };
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let model = HealthModel::new(&["IPv4"], SystemTime::now(), Duration::from_secs(600));
            let health = Health::new(model);
            health.set_node_eligible(true);
            let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
            let l = kpr_ops::listen::bind(any).unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            let stopped = async {
                let _ = stopped.await;
            };
            kpr_ops::server::serve_with(l, health, limits, stopped)
                .await
                .unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n";

    // Leave this process no free descriptor: a limit a little above the highest one in use,
    // the rest filled with /dev/null.
    let saved = getrlimit(Resource::Nofile);
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    let mut lowered = saved;
    lowered.current = Some(highest + 32);
    setrlimit(Resource::Nofile, lowered).unwrap();
    let mut filler = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        filler.push(f);
    }
    // One descriptor for a client: its connection waits in the accept queue, and the server's
    // accept fails with EMFILE.
    drop(filler.pop());
    let mut client = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (cpu0, wall0) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let (spent, wall) = (cpu() - cpu0, wall0.elapsed());
    assert_eq!(conns.open(), 0, "nothing could be accepted");

    // Descriptors free again: the waiting connection is taken and answered.
    filler.clear();
    setrlimit(Resource::Nofile, saved).unwrap();
    let start = Instant::now();
    client.write_all(request).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).unwrap();
    let recovered = start.elapsed();
    eprintln!(
        "out of descriptors: the process used {spent:.2?} of CPU in {wall:.2?} (a spinning accept loop: about one core); \
         answered {recovered:.2?} after descriptors were freed"
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        spent < Duration::from_millis(300),
        "{spent:?} of CPU in {wall:?}: the accept loop spins"
    );
    assert!(recovered < Duration::from_secs(2), "{recovered:?}");
    let _ = stop.send(());
    server.join().unwrap();
}
