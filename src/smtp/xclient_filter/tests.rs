use super::*;

use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

/// Filters `chunks` read one after another with `chunking`; what passes, and the refusals'
/// positions.
fn filtered(chunking: bool, chunks: &[&[u8]]) -> (Vec<u8>, Vec<u64>, Commands) {
    let mut commands = Commands::new(chunking);
    let mut refusals = VecDeque::new();
    let mut passed = Vec::new();
    let mut held = Vec::new();
    for chunk in chunks {
        held.extend_from_slice(chunk);
        let result = commands.filter(&mut held, &mut refusals);
        passed.extend_from_slice(&held[..result.kept]);
        held.drain(..result.consumed);
    }
    (passed, refusals.into(), commands)
}

#[test]
fn xclient_and_xforward_lines_are_dropped_wherever_they_split() {
    let input: &[u8] = b"MAIL FROM:<a@b>\r\nXCLIENT ADDR=6.6.6.6 LOGIN=boss\r\nRCPT TO:<c@d>\r\n \txforward NAME=x\r\nxclient\nNOOP\r\n";
    let expected: &[u8] = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nNOOP\r\n";
    for split in 0..input.len() {
        let (passed, refusals, commands) = filtered(false, &[&input[..split], &input[split..]]);
        assert_eq!(passed, expected, "split at {split}");
        // After MAIL; after MAIL and RCPT (twice).
        assert_eq!(refusals, [1, 2, 2], "split at {split}");
        assert_eq!(commands.due, 3);
    }
}

#[test]
fn verbs_that_only_begin_like_xclient_pass_and_endless_verbs_do_not() {
    let (passed, refusals, _) = filtered(false, &[b"XCLIENTS x\r\nXCLIEN\r\n"]);
    assert_eq!(passed, b"XCLIENTS x\r\nXCLIEN\r\n");
    assert!(refusals.is_empty());
    let endless = [
        vec![b' '; HEAD_MAX],
        b"XCLIENT ADDR=6.6.6.6\r\nNOOP\r\n".to_vec(),
    ]
    .concat();
    let (passed, refusals, _) = filtered(false, &[&endless]);
    assert_eq!(passed, b"NOOP\r\n");
    assert_eq!(refusals, [0]);
}

#[test]
fn message_content_passes_whole_only_after_354() {
    let mut commands = Commands::new(false);
    let mut refusals = VecDeque::new();
    let mut input = b"DATA\r\nXCLIENT ADDR=1.2.3.4\r\n.\r\n".to_vec();
    let first = commands.filter(&mut input, &mut refusals);
    assert_eq!(
        first,
        Filtered {
            kept: 6,
            consumed: 6
        }
    );
    assert_eq!(commands.mode, Mode::AwaitingData { reply: 1 });
    // The upstream refused DATA: what follows are commands.
    let mut refused = commands_after_data_reply(b'5');
    let mut rest = input[6..].to_vec();
    let result = refused.filter(&mut rest, &mut refusals);
    assert_eq!(&rest[..result.kept], b".\r\n");
    assert_eq!(refusals, [1]);
    // It took it: content, up to the line `.` alone, including a line that looks like XCLIENT.
    let mut accepted = commands_after_data_reply(b'3');
    let mut content = b"XCLIENT ADDR=1.2.3.4\r\n..\r\n.x\r\n.\nXCLIENT A=b\r\n".to_vec();
    let mut refusals = VecDeque::new();
    let result = accepted.filter(&mut content, &mut refusals);
    assert_eq!(
        &content[..result.kept],
        b"XCLIENT ADDR=1.2.3.4\r\n..\r\n.x\r\n.\n"
    );
    assert_eq!(refusals, [2]);
    assert_eq!(accepted.due, 2);
}

fn commands_after_data_reply(code: u8) -> Commands {
    let mut commands = Commands::new(false);
    let mut data = b"DATA\r\n".to_vec();
    commands.filter(&mut data, &mut VecDeque::new());
    assert!(commands.data_reply(1, code));
    commands
}

#[test]
fn a_bdat_chunk_is_skipped_by_its_length_only_when_the_upstream_offers_chunking() {
    let input: &[u8] = b"BDAT 22 LAST\r\nXCLIENT ADDR=6.6.6.6\r\nXCLIENT ADDR=6.6.6.6\r\n";
    for split in 0..input.len() {
        let (passed, refusals, commands) = filtered(true, &[&input[..split], &input[split..]]);
        assert_eq!(
            passed, b"BDAT 22 LAST\r\nXCLIENT ADDR=6.6.6.6\r\n",
            "split at {split}"
        );
        assert_eq!(refusals, [1]);
        assert_eq!(commands.due, 1);
    }
    let (passed, refusals, _) = filtered(false, &[input]);
    assert_eq!(passed, b"BDAT 22 LAST\r\n");
    assert_eq!(refusals, [1, 1]);
    // Not a well-formed BDAT: the upstream answers it at once and so reads no chunk.
    let (passed, _, _) = filtered(true, &[b"BDAT 22 NEXT\r\nXCLIENT A\r\n"]);
    assert_eq!(passed, b"BDAT 22 NEXT\r\n");
}

#[test]
fn replies_are_counted_across_lines_and_chunks() {
    let mut replies = Replies::default();
    let mut done = Vec::new();
    replies.observe(b"250-a\r\n250 b\r\n35", |n, code, _| done.push((n, code)));
    replies.observe(b"4 go\r\n", |n, code, _| done.push((n, code)));
    assert_eq!(done, [(1, b'2'), (2, b'3')]);
    assert_eq!(replies.end_of(b"250 x\r\n221 y\r\n", 4), Some(14));
    assert_eq!(replies.end_of(b"250 x\r\n", 4), None);
}

/// Through the stream: a client pipelines MAIL, XCLIENT, RCPT; the upstream's replies come in
/// pieces; the refusal lands between them, and the upstream never sees XCLIENT.
#[tokio::test]
async fn the_refusal_comes_in_command_order_under_pipelining() {
    let (client, near) = duplex(4096);
    let mut filter = XclientFilter::new(near, false);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    client_write
        .write_all(b"MAIL FROM:<a@b>\r\nXCLIENT ADDR=6.6.6.6\r\nRCPT TO:<c@d>\r\n")
        .await
        .unwrap();
    let mut upstream_got = vec![0u8; 64];
    let n = filter.read(&mut upstream_got).await.unwrap();
    assert_eq!(&upstream_got[..n], b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
    for piece in [&b"250 2.1"[..], b".0 Ok\r\n250 2.1.5 Ok\r\n"] {
        filter.write_all(piece).await.unwrap();
    }
    filter.flush().await.unwrap();
    drop(filter);
    let mut said = String::new();
    client_read.read_to_string(&mut said).await.unwrap();
    assert_eq!(
        said,
        "250 2.1.0 Ok\r\n502 5.5.1 Command not implemented\r\n250 2.1.5 Ok\r\n"
    );
}

/// Nothing outstanding: the refusal goes out at once, and reading waits after DATA until its
/// reply is through.
#[tokio::test]
async fn an_idle_refusal_goes_at_once_and_data_waits_for_its_reply() {
    let (client, near) = duplex(4096);
    let mut filter = XclientFilter::new(near, false);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    client_write
        .write_all(b"XCLIENT ADDR=6.6.6.6\r\nDATA\r\nXCLIENT A=b\r\n")
        .await
        .unwrap();
    let mut upstream_got = vec![0u8; 64];
    let n = filter.read(&mut upstream_got).await.unwrap();
    assert_eq!(&upstream_got[..n], b"DATA\r\n");
    let mut refusal = vec![0u8; REFUSAL.len()];
    client_read.read_exact(&mut refusal).await.unwrap();
    assert_eq!(refusal, REFUSAL);
    let waiting = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        filter.read(&mut upstream_got),
    );
    assert!(waiting.await.is_err(), "read on before DATA's reply");
    filter.write_all(b"354 go ahead\r\n").await.unwrap();
    let n = filter.read(&mut upstream_got).await.unwrap();
    assert_eq!(&upstream_got[..n], b"XCLIENT A=b\r\n");
}

/// Postfix's tokenizer (smtpd_token.c) splits on ISSPACE: vertical tab, form feed and CR are
/// blanks too, before the verb and after it.
#[test]
fn xclient_behind_other_ascii_blanks_is_dropped() {
    for line in [
        &b"\x0bXCLIENT ADDR=6.6.6.6 LOGIN=boss\r\n"[..],
        b"\x0cXCLIENT ADDR=6.6.6.6 LOGIN=boss\r\n",
        b"\rXCLIENT ADDR=6.6.6.6 LOGIN=boss\r\n",
        b"XCLIENT\x0bADDR=6.6.6.6\x0bLOGIN=boss\r\n",
        b"XFORWARD\x0cADDR=6.6.6.6\r\n",
    ] {
        let (passed, refusals, _) = filtered(false, &[line]);
        assert_eq!(
            passed,
            b"",
            "passed on: {:?}",
            line.escape_ascii().to_string()
        );
        assert_eq!(refusals, [0]);
    }
}

/// Postfix's smtp_get strips every CR before the LF, so `.\r\r\n` ends the message there;
/// what follows is a command to it and must be one to the filter too.
#[test]
fn a_dot_line_with_two_crs_ends_the_content() {
    let mut accepted = commands_after_data_reply(b'3');
    let mut refusals = VecDeque::new();
    let mut input = b"Subject: x\r\n\r\nhi\r\n.\r\r\nXCLIENT ADDR=6.6.6.6 LOGIN=boss\r\n".to_vec();
    let result = accepted.filter(&mut input, &mut refusals);
    assert_eq!(&input[..result.kept], b"Subject: x\r\n\r\nhi\r\n.\r\r\n");
    assert_eq!(refusals, [2]);
}

/// Postfix parses the BDAT size with off_cvt_string into an off_t: past i64::MAX it answers
/// `501 5.5.4 Syntax: BDAT count [LAST]` and reads the next bytes as commands. The filter
/// must not take them for a chunk.
#[test]
fn a_bdat_size_past_off_t_is_no_chunk() {
    let (passed, refusals, _) = filtered(
        true,
        &[b"BDAT 9223372036854775808\r\nXCLIENT ADDR=6.6.6.6 LOGIN=boss\r\n"],
    );
    assert_eq!(passed, b"BDAT 9223372036854775808\r\n");
    assert_eq!(refusals, [1]);
}

/// With a plaintext upstream link that offers STARTTLS (Debian's Postfix does), a logged-in
/// client's STARTTLS starts TLS between the client and the upstream through the splice, and
/// the filter sees only ciphertext after it: XCLIENT LOGIN=... inside it goes through.
#[test]
fn starttls_after_login_is_not_passed_on() {
    let (passed, refusals, _) = filtered(false, &[b"STARTTLS\r\n"]);
    assert_eq!(passed, b"", "STARTTLS reached the upstream");
    assert_eq!(refusals, [0]);
}

/// MAX_WAITING_REFUSALS is checked only before a read: one read of short XCLIENT lines queues
/// one refusal per 8 bytes (and 36 bytes of `out` each once due).
#[tokio::test]
async fn one_read_cannot_queue_more_refusals_than_the_cap() {
    let (client, near) = duplex(256 * 1024);
    let mut filter = XclientFilter::new(near, false);
    let (_client_read, mut client_write) = tokio::io::split(client);
    let mut input = b"NOOP\r\n".to_vec();
    input.extend(b"XCLIENT\n".repeat(10_000));
    client_write.write_all(&input).await.unwrap();
    // As large as the splice's read.
    let mut upstream_got = vec![0u8; 128 * 1024];
    let n = filter.read(&mut upstream_got).await.unwrap();
    assert_eq!(&upstream_got[..n], b"NOOP\r\n");
    assert!(
        filter.refusals.len() <= MAX_WAITING_REFUSALS,
        "{} refusals queued",
        filter.refusals.len()
    );
}

/// A goodbye written at a stop counts as the reply a refusal waits for, and the refusal then
/// follows the 421 on the shutdown: the client hears a 502 after the server said it closes.
#[tokio::test]
async fn nothing_follows_a_closing_421() {
    let (client, near) = duplex(4096);
    let mut filter = XclientFilter::new(near, false);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    client_write
        .write_all(b"MAIL FROM:<a@b>\r\nXCLIENT ADDR=6.6.6.6\r\n")
        .await
        .unwrap();
    let mut upstream_got = vec![0u8; 64];
    let n = filter.read(&mut upstream_got).await.unwrap();
    assert_eq!(&upstream_got[..n], b"MAIL FROM:<a@b>\r\n");
    filter
        .write_all(b"421 4.3.2 Service shutting down\r\n")
        .await
        .unwrap();
    filter.shutdown().await.unwrap();
    drop(filter);
    let mut said = String::new();
    client_read.read_to_string(&mut said).await.unwrap();
    assert_eq!(said, "421 4.3.2 Service shutting down\r\n");
}
