//! The gateway's ClientHello reader must never panic, must ask for more bytes only within
//! bounds, and must agree with itself when the same bytes arrive in two parts.
#![no_main]

use eastwest_gateway::hello::{parse, Progress, MAX_HELLO};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Progress::Done(h)) => {
            assert!(h.consumed <= data.len());
            // The same bytes up to `consumed` give the same answer.
            assert_eq!(parse(&data[..h.consumed]), Ok(Progress::Done(h.clone())));
            if let Some(s) = &h.sni {
                assert!(s.bytes().all(|b| b.is_ascii_graphic()));
                let _ = eastwest_gateway::sni::parse(s);
            }
        }
        Ok(Progress::NeedMore(n)) => assert!(n >= 1 && n <= MAX_HELLO + 16 * 1024 + 5),
        Err(e) => {
            let _ = e.alert();
        }
    }
});
