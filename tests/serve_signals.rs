//! `hearth serve` as a process: SIGTERM while a client is streaming drains — at once
//! `/health` answers 503 and new requests 503 with `Retry-After` (while the stream is still
//! running, so a load balancer takes the replica out and retries elsewhere), the stream runs
//! to its last chunk and `data: [DONE]`, then the listener closes and the process exits 0.

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

/// Sends `raw` on a new connection and reads the answer until the server closes it.
fn request(addr: &str, raw: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        raw.replace("Host: x\r\n", "Host: x\r\nConnection: close\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
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
    // The server says it is draining ...
    let mut log = String::new();
    while !log.contains("draining") {
        let n = stderr.read_line(&mut log).unwrap();
        assert!(n > 0, "stderr closed before 'draining': {log}");
    }
    // ... and, while the stream is still being generated, turns work away in the API's
    // shape with Retry-After, and fails its health check.
    let answer = request(&addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("draining"), "{answer}");
    let body = r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":4}"#;
    let answer = request(
        &addr,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1"), "{answer}");
    assert!(lower.contains("connection: close"), "{answer}");
    assert!(lower.contains("x-hearth-replica: "), "{answer}");
    assert!(answer.contains("\"code\":\"unavailable\""), "{answer}");
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
