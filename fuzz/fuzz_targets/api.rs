//! The agent's message parser: any bytes, cut into the pieces a socket may
//! deliver them in, go through the framing (`LineReader`) and the request
//! parser (`Request`), and each `run`, `attach` or `game` request through
//! the checks it meets before anything is created (`Plan::from_request`,
//! `game_plan`). None may panic; every line is shorter than the bound and
//! holds no newline; a request that parses encodes (as the CLI sends it) to
//! a line that parses again.
#![no_main]

use enforcer::{
    agent::{
        proto::{LineReader, MAX_MESSAGE, Request, encode},
        shim,
    },
    cli::game::game_plan,
    config::Config,
    job::session::Plan,
};
use libfuzzer_sys::fuzz_target;

fn check(line: &[u8]) {
    let Ok(request) = serde_json::from_slice::<Request>(line) else {
        return;
    };
    let encoded = encode(&request);
    let again = &encoded[..encoded.len() - 1];
    assert!(!again.contains(&b'\n'), "an encoded request spans lines");
    if let Err(e) = serde_json::from_slice::<Request>(again) {
        panic!(
            "{:?} encodes to {:?}, which does not parse: {e}",
            String::from_utf8_lossy(line),
            String::from_utf8_lossy(again)
        );
    }
    match request {
        Request::Run { job, command, .. } => {
            let _ = Plan::from_request(Config::default(), &shim::sanitize(*job), &command);
        }
        Request::Attach { job, .. } => {
            let _ = Plan::from_request(Config::default(), &shim::sanitize(*job), &[]);
        }
        Request::Game { game, .. } => {
            let _ = game_plan(Config::default(), &game);
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte sets how the rest arrives: in pieces of 1 to 256
    // bytes, as recvmsg may hand them over.
    let Some((&piece, data)) = data.split_first() else {
        return;
    };
    let mut pieces = data.chunks(usize::from(piece) + 1);
    let mut reader = LineReader::default();
    loop {
        match reader.next_line() {
            Ok(Some(line)) => {
                assert!(line.len() < MAX_MESSAGE, "a line over the bound came out");
                assert!(!line.contains(&b'\n'), "a line came out with a newline");
                check(&line);
            }
            Ok(None) => match pieces.next() {
                Some(p) => reader.feed(p),
                None if !reader.at_eof() => reader.finish(),
                None => break,
            },
            Err(_) => break,
        }
    }
});
