//! The NBD server's byte stream: arbitrary client bytes into a sans-I/O `Connection` that
//! serves a small in-memory disk (a qcow2 image or raw bytes on a `MemDisk`). The server may
//! refuse, reply with errors or close; it must not panic, stall with input waiting, or
//! buffer more than its high-water mark plus one reply piece.
//!
//! Input: byte 0 picks the disk and configuration, byte 1 how the rest is cut into the
//! pieces the socket would deliver; the rest is what the client sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow_metal::block::MemDisk;
use qcow_metal::disk::{RawDisk, VirtualDisk};
use qcow_metal::nbd::{Connection, NbdStats, ServerConfig};
use qcow_metal::qcow2::{CreateOptions, Qcow2};

const DISK_SIZE: u64 = 1 << 20;
const HIGH_WATER: u32 = 128 << 10;
const IO_CHUNK: u32 = 64 << 10;

fn serve(
    disk: &mut dyn VirtualDisk,
    config: &ServerConfig,
    cut: usize,
    shutdown_at: usize,
    mut input: &[u8],
) {
    let mut conn = Connection::new(config);
    let mut stats = NbdStats::default();
    let mut fed = 0;
    // Every step either takes input, produces output or ends the session.
    for _ in 0..1_000_000 {
        let piece = &input[..input.len().min(cut)];
        let took = conn.receive(piece);
        input = &input[took..];
        fed += took;
        if fed >= shutdown_at {
            conn.shutdown();
        }
        let progressed = conn.process(disk, &mut stats);
        let out = conn.output().len();
        // Bounded: the high-water mark plus one piece of a read and its chunk header.
        assert!(
            out <= (HIGH_WATER + IO_CHUNK) as usize + 4096,
            "{out} output bytes buffered"
        );
        conn.consume_output(out);
        if conn.is_closed() {
            break;
        }
        if took == 0 && !progressed && out == 0 {
            assert!(
                input.is_empty(),
                "the server takes no more input and makes no progress ({} bytes waiting)",
                input.len()
            );
            break;
        }
    }
    conn.close(&mut stats);
    assert!(conn.is_closed() || conn.is_closing());
}

fn run(data: &[u8]) {
    let [setup, cut, input @ ..] = data else {
        return;
    };
    let config = ServerConfig {
        read_only: setup & 1 != 0,
        description: if setup & 2 != 0 {
            String::from("fuzz disk")
        } else {
            String::new()
        },
        max_payload: if setup & 4 != 0 { 4096 } else { 2 << 20 },
        io_chunk: IO_CHUNK,
        output_high_water: HIGH_WATER,
        ..ServerConfig::named("disk")
    };
    let cut = match cut % 4 {
        0 => usize::MAX,
        1 => 1,
        2 => 7,
        _ => 1000,
    };
    // Sometimes the server starts shutting down part-way through.
    let shutdown_at = if setup & 8 != 0 {
        input.len() / 2
    } else {
        usize::MAX
    };
    if setup & 16 != 0 {
        let mut disk = RawDisk::new(MemDisk::fixed(DISK_SIZE));
        serve(&mut disk, &config, cut, shutdown_at, input);
    } else {
        let mut q = Qcow2::create(
            MemDisk::growable(),
            &CreateOptions {
                virtual_size: DISK_SIZE,
                cluster_size: 4096,
                ..CreateOptions::default()
            },
        )
        .expect("create");
        serve(&mut q, &config, cut, shutdown_at, input);
        let report = q.check().expect("check");
        assert_eq!(report.corruptions, 0, "{report}");
        assert_eq!(report.check_errors, 0, "{report}");
    }
}

fuzz_target!(|data: &[u8]| run(data));
