//! `hearth serve` as a process: SIGTERM while a client is streaming ends cleanly — new
//! connections are refused at once (while the stream is still running), the stream runs to
//! its last chunk and `data: [DONE]`, and the process exits 0.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

fn start_server(
    extra: &[&str],
) -> (
    std::process::Child,
    String,
    BufReader<std::process::ChildStderr>,
) {
    let mut args = vec!["--ctx", "512", "--parallel", "2"];
    args.extend_from_slice(extra);
    common::spawn_server(&args)
}

fn open_stream(addr: &str, max_tokens: u32) -> TcpStream {
    let body = format!(
        r#"{{"model":"smollm2","messages":[{{"role":"user","content":"Write a long essay about the sea."}}],"stream":true,"max_tokens":{max_tokens},"temperature":0}}"#
    );
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// Reads until `needle` has been seen; returns everything read.
fn read_until(s: &mut TcpStream, seen: &mut String, needle: &str) {
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        let n = s.read(&mut buf).expect("stream readable");
        assert!(n > 0, "connection closed before {needle:?}: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

fn wait_exit(server: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = server.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            panic!("hearth serve still running {limit:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(server: &std::process::Child) {
    // The shell's built-in `kill`: no procps needed on a minimal machine.
    let ok = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", server.id())])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn sigterm_while_streaming_finishes_the_stream_and_exits_0() {
    let (mut server, addr, mut stderr) = start_server(&[]);
    let mut stream = open_stream(&addr, 200);
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, "\"content\":\"");
    sigterm(&server);
    // The server says it is shutting down ...
    let mut log = String::new();
    while !log.contains("shutting down") {
        let n = stderr.read_line(&mut log).unwrap();
        assert!(n > 0, "stderr closed before 'shutting down': {log}");
    }
    // ... and refuses new connections (within moments: the listener is closed right after
    // that line) while the stream is still being generated: the process has not exited.
    let deadline = Instant::now() + Duration::from_secs(2);
    while TcpStream::connect(&addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting 2 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        server.try_wait().unwrap().is_none(),
        "the server exited before the stream finished"
    );
    // The rest of the stream arrives whole, ends with [DONE] and the chunked terminator.
    read_until(&mut stream, &mut seen, "data: [DONE]");
    read_until(&mut stream, &mut seen, "0\r\n\r\n");
    assert!(seen.contains("\"finish_reason\":\"length\""), "{seen}");
    let chunks = seen.matches("\"content\":").count();
    assert!(chunks >= 190, "only {chunks} chunks: {seen}");
    let status = wait_exit(&mut server, Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    assert!(TcpStream::connect(&addr).is_err(), "still accepting");
    stderr.read_to_string(&mut log).unwrap();
    assert!(log.contains("stopped"), "{log}");
}

#[test]
fn sigterm_with_a_stream_longer_than_the_grace_exits_in_time() {
    let (mut server, addr, _stderr) = start_server(&["--shutdown-grace", "1"]);
    let mut stream = open_stream(&addr, 450);
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, "\"content\":\"");
    let t = Instant::now();
    sigterm(&server);
    let status = wait_exit(&mut server, Duration::from_secs(15));
    assert!(status.success(), "exit status {status}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}
