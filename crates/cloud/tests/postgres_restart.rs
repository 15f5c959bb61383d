//! The PostgreSQL listener outlives its server: after `pg_ctl restart`
//! every replica reconnects, sends `resync` (it may have missed events
//! meanwhile), and events flow again. It restarts the server the whole
//! test binary shares, so it is the only test here.
//!
//! Needs `ROOST_TEST_POSTGRES` (the server) and
//! `ROOST_TEST_POSTGRES_RESTART` (a command that restarts it), both set by
//! `. scripts/postgres.sh`; with `CI=true` their absence is a failure.

use roost_cloud::db::Db;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

fn wait_for(rx: &mut broadcast::Receiver<String>, want: &str, within: Duration) -> Vec<String> {
    let until = Instant::now() + within;
    let mut seen = Vec::new();
    while Instant::now() < until {
        match rx.try_recv() {
            Ok(e) => {
                let done = e == want;
                seen.push(e);
                if done {
                    return seen;
                }
            }
            Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    panic!("no {want:?} within {within:?}; saw {seen:?}");
}

#[test]
fn the_listener_survives_a_server_restart_and_sends_resync() {
    let (Ok(admin), Ok(restart)) = (
        std::env::var("ROOST_TEST_POSTGRES"),
        std::env::var("ROOST_TEST_POSTGRES_RESTART"),
    ) else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true but ROOST_TEST_POSTGRES(_RESTART) is not set: .ci/run starts the server with scripts/postgres.sh"
        );
        eprintln!("note: ROOST_TEST_POSTGRES(_RESTART) not set: skipped; `. scripts/postgres.sh` sets them");
        return;
    };
    let name = format!("roost_t_{:016x}", rand::random::<u64>());
    let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    drop(c);
    let (base, _) = admin.rsplit_once('/').unwrap();
    let url = format!("{base}/{name}");

    let a = Db::open_postgres(&url).unwrap();
    let b = Db::open_postgres(&url).unwrap();
    let (mut on_a, mut on_b) = (a.events(), b.events());
    let status = std::process::Command::new(&restart).status().unwrap();
    assert!(status.success(), "{restart} failed");
    wait_for(&mut on_a, "resync", Duration::from_secs(60));
    wait_for(&mut on_b, "resync", Duration::from_secs(60));
    // The pool's connections died with the server: new ones are made, and
    // events cross replicas again.
    b.transaction(|tx| {
        tx.notify("after-restart");
        Ok(())
    })
    .unwrap();
    wait_for(&mut on_a, "after-restart", Duration::from_secs(10));
    assert_eq!(
        b.schema_version().unwrap(),
        roost_cloud::db::known_version()
    );

    drop((a, b));
    let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .unwrap();
}
