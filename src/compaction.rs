//! When the guest compacts its image online: the [`Scheduler`] turns the
//! [`CompactionPolicy`] of the command line into decisions the main loop acts on.
//!
//! A pass starts when enough bytes were freed since the last one (`compact_after`), or when
//! the image is found compactable at boot ([`Scheduler::arm`]). While a pass is on, the loop
//! asks [`Scheduler::next_step`] for a byte budget: none while an NBD request came in the last
//! `compact_idle` milliseconds, none until the token bucket of `compact_rate` holds at least
//! one cluster; otherwise at most [`Scheduler::MAX_STEP_BYTES`], so that a step keeps the
//! loop responsive. The loop moves that many bytes with the engine's `compact_step` and says
//! how it went ([`Scheduler::step_done`]); the pass ends when the engine says nothing is left.
//!
//! The scheduler does no I/O and reads no clock: the loop passes the time in, so it is
//! tested on the host.

use crate::config::CompactionPolicy;

/// What online compaction is doing, as the metrics show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CompactionState {
    /// Switched off on the command line (`compact=off`), or no qcow2 image.
    #[default]
    Off,
    /// Nothing to do: not enough freed since the last pass.
    Idle,
    /// A pass is on, paused: NBD requests came recently, or the rate limit holds it back.
    Waiting,
    /// A pass is on and moved clusters in its last step.
    Running,
}

impl CompactionState {
    /// Every state, in the order of [`CompactionState::index`].
    pub const ALL: [CompactionState; 4] = [
        CompactionState::Off,
        CompactionState::Idle,
        CompactionState::Waiting,
        CompactionState::Running,
    ];

    /// The `state` label value.
    pub fn name(self) -> &'static str {
        match self {
            CompactionState::Off => "off",
            CompactionState::Idle => "idle",
            CompactionState::Waiting => "waiting",
            CompactionState::Running => "running",
        }
    }

    /// Position in [`CompactionState::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The online compaction policy at work (see the module documentation).
#[derive(Debug, Clone)]
pub struct Scheduler {
    policy: CompactionPolicy,
    state: CompactionState,
    /// Bytes freed in total when the last pass ended (or at the start).
    freed_mark: u64,
    /// NBD requests seen so far, and when that count last changed.
    requests_seen: u64,
    last_request_ms: u64,
    /// Token bucket of the rate limit, in bytes, and when it was last filled.
    tokens: u64,
    filled_ms: u64,
    passes: u64,
    moved_bytes: u64,
}

impl Scheduler {
    /// The largest budget of one step: 1 MiB, a few milliseconds of device I/O.
    pub const MAX_STEP_BYTES: u64 = 1 << 20;

    /// A scheduler that starts at `now_ms`, with `freed_bytes` and `nbd_requests` the
    /// counts so far (only what is freed from now on counts towards a pass).
    pub fn new(
        policy: CompactionPolicy,
        now_ms: u64,
        freed_bytes: u64,
        nbd_requests: u64,
    ) -> Scheduler {
        Scheduler {
            policy,
            state: if policy.enabled {
                CompactionState::Idle
            } else {
                CompactionState::Off
            },
            freed_mark: freed_bytes,
            requests_seen: nbd_requests,
            last_request_ms: now_ms,
            tokens: 0,
            filled_ms: now_ms,
            passes: 0,
            moved_bytes: 0,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &CompactionPolicy {
        &self.policy
    }

    /// What compaction is doing now.
    pub fn state(&self) -> CompactionState {
        self.state
    }

    /// Passes finished since boot.
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// Bytes moved since boot.
    pub fn moved_bytes(&self) -> u64 {
        self.moved_bytes
    }

    /// Whether a pass is on (running or waiting).
    pub fn in_pass(&self) -> bool {
        matches!(
            self.state,
            CompactionState::Waiting | CompactionState::Running
        )
    }

    /// Starts a pass now, whatever was freed (the image was found compactable at boot).
    /// Does nothing when compaction is off.
    pub fn arm(&mut self) {
        if self.state == CompactionState::Idle {
            self.state = CompactionState::Waiting;
        }
    }

    /// Takes in the counts as of `now_ms`: bytes freed by the engine since it opened, NBD
    /// requests since boot. A new request pauses compaction; enough freed starts a pass.
    pub fn observe(&mut self, now_ms: u64, freed_bytes: u64, nbd_requests: u64) {
        if nbd_requests != self.requests_seen {
            self.requests_seen = nbd_requests;
            self.last_request_ms = now_ms;
        }
        if self.state == CompactionState::Idle
            && freed_bytes.saturating_sub(self.freed_mark) >= self.policy.after_bytes.max(1)
        {
            self.state = CompactionState::Waiting;
        }
    }

    /// How many bytes the next step may move now (at least `unit`, the cluster size), or
    /// `None` when no pass is on, an NBD request came too recently, or the rate limit holds
    /// it back.
    pub fn next_step(&mut self, now_ms: u64, unit: u64) -> Option<u64> {
        if !self.in_pass() {
            return None;
        }
        self.fill(now_ms, unit);
        if now_ms < self.last_request_ms.saturating_add(self.policy.idle_ms) {
            self.state = CompactionState::Waiting;
            return None;
        }
        if self.tokens < unit.max(1) {
            self.state = CompactionState::Waiting;
            return None;
        }
        Some(self.tokens.min(Self::MAX_STEP_BYTES.max(unit)))
    }

    /// The step that [`Scheduler::next_step`] allowed moved `moved_bytes`; `done` when the
    /// engine found nothing left to move. `freed_bytes` is the engine's count after it.
    /// A step that moved nothing still costs one `unit`, so a pass never spins.
    pub fn step_done(&mut self, moved_bytes: u64, unit: u64, done: bool, freed_bytes: u64) {
        self.tokens = self.tokens.saturating_sub(moved_bytes.max(unit.max(1)));
        self.moved_bytes += moved_bytes;
        if done {
            self.end_pass(freed_bytes);
        } else {
            self.state = CompactionState::Running;
        }
    }

    /// The step failed: the pass ends (the next one starts when more is freed).
    pub fn step_failed(&mut self, freed_bytes: u64) {
        self.end_pass(freed_bytes);
    }

    /// The earliest time a step could run, while a pass is on: when the NBD silence is long
    /// enough and the bucket holds a cluster.
    pub fn next_deadline_ms(&self, now_ms: u64, unit: u64) -> Option<u64> {
        if !self.in_pass() {
            return None;
        }
        let quiet = self.last_request_ms.saturating_add(self.policy.idle_ms);
        let missing = unit.max(1).saturating_sub(self.tokens);
        let refill = missing
            .saturating_mul(1000)
            .div_ceil(self.policy.rate_bytes_per_sec.max(1));
        Some(quiet.max(now_ms.saturating_add(refill)))
    }

    /// Bytes freed while a pass ran are mostly the pass's own (the old copies): counting
    /// starts again from what was freed when it ended.
    fn end_pass(&mut self, freed_bytes: u64) {
        self.passes += 1;
        self.freed_mark = freed_bytes;
        self.state = CompactionState::Idle;
    }

    /// Adds the tokens earned since the last fill; the bucket holds at most one step's
    /// budget, so a long pause does not become a burst.
    fn fill(&mut self, now_ms: u64, unit: u64) {
        let elapsed = now_ms.saturating_sub(self.filled_ms);
        if elapsed == 0 {
            return;
        }
        let earned = self.policy.rate_bytes_per_sec.saturating_mul(elapsed) / 1000;
        if earned > 0 {
            let cap = Self::MAX_STEP_BYTES.max(unit);
            self.tokens = self.tokens.saturating_add(earned).min(cap);
            self.filled_ms = now_ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const CLUSTER: u64 = 64 << 10;

    fn policy() -> CompactionPolicy {
        CompactionPolicy::default()
    }

    #[test]
    fn off_never_starts() {
        let mut s = Scheduler::new(
            CompactionPolicy {
                enabled: false,
                ..policy()
            },
            0,
            0,
            0,
        );
        s.arm();
        s.observe(10_000, 1 << 40, 0);
        assert_eq!(s.state(), CompactionState::Off);
        assert_eq!(s.next_step(20_000, CLUSTER), None);
        assert_eq!(s.next_deadline_ms(20_000, CLUSTER), None);
    }

    #[test]
    fn a_pass_starts_after_enough_is_freed_since_boot() {
        // 100 MiB were freed before the scheduler started: they do not count.
        let mut s = Scheduler::new(policy(), 0, 100 * MIB, 0);
        s.observe(5000, 100 * MIB + 16 * MIB - 1, 0);
        assert_eq!(s.state(), CompactionState::Idle);
        assert_eq!(s.next_step(6000, CLUSTER), None);
        s.observe(6000, 116 * MIB, 0);
        assert_eq!(s.state(), CompactionState::Waiting);
        assert!(s.in_pass());
    }

    #[test]
    fn requests_pause_it_for_the_idle_time() {
        let mut s = Scheduler::new(policy(), 0, 0, 0);
        s.observe(0, 200 * MIB, 5);
        // The requests count changed at 0 ms: nothing until 1 s of silence.
        assert_eq!(s.next_step(999, CLUSTER), None);
        assert_eq!(s.state(), CompactionState::Waiting);
        assert_eq!(s.next_deadline_ms(999, CLUSTER), Some(1000));
        let budget = s.next_step(1000, CLUSTER).expect("idle long enough");
        assert_eq!(
            budget,
            Scheduler::MAX_STEP_BYTES,
            "the bucket holds one step"
        );
        s.step_done(budget, CLUSTER, false, 200 * MIB);
        assert_eq!(s.state(), CompactionState::Running);
        // A request at 1500 ms pauses it again until 2500 ms.
        s.observe(1500, 200 * MIB, 6);
        assert_eq!(s.next_step(2000, CLUSTER), None);
        assert_eq!(s.state(), CompactionState::Waiting);
        assert_eq!(s.next_deadline_ms(2000, CLUSTER), Some(2500));
        assert!(s.next_step(2500, CLUSTER).is_some());
    }

    #[test]
    fn the_rate_limit_holds() {
        let rate = 4 * MIB;
        let mut s = Scheduler::new(
            CompactionPolicy {
                rate_bytes_per_sec: rate,
                idle_ms: 0,
                ..policy()
            },
            0,
            0,
            0,
        );
        s.arm();
        // Ten simulated seconds, a step whenever one is allowed, every millisecond.
        let mut moved = 0;
        for now in 0..10_000 {
            if let Some(budget) = s.next_step(now, CLUSTER) {
                assert!((CLUSTER..=Scheduler::MAX_STEP_BYTES).contains(&budget));
                moved += budget;
                s.step_done(budget, CLUSTER, false, 0);
            }
        }
        assert!(moved <= 10 * rate, "{moved} bytes in 10 s at {rate}/s");
        assert!(moved >= 10 * rate - Scheduler::MAX_STEP_BYTES, "{moved}");
    }

    #[test]
    fn a_slow_rate_still_moves_a_cluster_at_a_time() {
        let mut s = Scheduler::new(
            CompactionPolicy {
                rate_bytes_per_sec: 1024,
                idle_ms: 0,
                ..policy()
            },
            0,
            0,
            0,
        );
        s.arm();
        assert_eq!(s.next_step(1000, CLUSTER), None);
        let at = s.next_deadline_ms(1000, CLUSTER).unwrap();
        assert_eq!(at, 64_000, "64 KiB at 1 KiB/s");
        assert_eq!(s.next_step(at, CLUSTER), Some(CLUSTER));
    }

    #[test]
    fn a_pass_ends_when_the_engine_is_done_and_counts_again_from_there() {
        let mut s = Scheduler::new(
            CompactionPolicy {
                idle_ms: 0,
                ..policy()
            },
            0,
            0,
            0,
        );
        s.observe(0, 20 * MIB, 0);
        let b = s.next_step(1000, CLUSTER).unwrap();
        s.step_done(b, CLUSTER, false, 21 * MIB);
        let b2 = s.next_step(2000, CLUSTER).unwrap();
        // The pass freed 40 MiB of old copies: they do not start another pass.
        s.step_done(b2 / 2, CLUSTER, true, 60 * MIB);
        assert_eq!(s.state(), CompactionState::Idle);
        assert_eq!(s.passes(), 1);
        assert_eq!(s.moved_bytes(), b + b2 / 2);
        s.observe(3000, 60 * MIB, 0);
        assert_eq!(s.state(), CompactionState::Idle);
        s.observe(4000, 76 * MIB, 0);
        assert_eq!(s.state(), CompactionState::Waiting);
        s.step_failed(76 * MIB);
        assert_eq!(s.state(), CompactionState::Idle);
        assert_eq!(s.passes(), 2);
    }

    #[test]
    fn a_step_that_moves_nothing_still_waits_its_turn() {
        let mut s = Scheduler::new(
            CompactionPolicy {
                rate_bytes_per_sec: CLUSTER,
                idle_ms: 0,
                ..policy()
            },
            0,
            0,
            0,
        );
        s.arm();
        assert_eq!(s.next_step(1000, CLUSTER), Some(CLUSTER));
        s.step_done(0, CLUSTER, false, 0);
        assert_eq!(s.next_step(1000, CLUSTER), None);
        assert_eq!(s.next_deadline_ms(1000, CLUSTER), Some(2000));
    }

    /// The scheduler driving the engine as the guest's loop does, on simulated time: 64
    /// clusters written, the first 48 trimmed (3 MiB freed, `compact_after=1M`), NBD
    /// requests until 2 s, 512 KiB/s: the pass waits for the silence, then moves the 16 live
    /// clusters no faster than the rate, ends, and the extent falls by the trimmed part.
    #[test]
    fn the_scheduler_drives_the_engine_within_its_policy() {
        use crate::block::MemDisk;
        use crate::disk::VirtualDisk;
        use crate::qcow2::{CreateOptions, Qcow2};
        let mut q = Qcow2::create(
            MemDisk::growable(),
            &CreateOptions {
                virtual_size: 8 * MIB,
                cluster_size: CLUSTER,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let data: Vec<u8> = (0..64 * CLUSTER).map(|i| (i % 251) as u8 | 1).collect();
        q.write(0, &data).unwrap();
        q.flush().unwrap();
        let full = q.image_extent();
        let rate = 512 << 10;
        let policy = CompactionPolicy {
            after_bytes: MIB,
            rate_bytes_per_sec: rate,
            idle_ms: 1000,
            ..policy()
        };
        let freed = |q: &Qcow2<MemDisk>| q.stats().clusters_freed * CLUSTER;
        let mut s = Scheduler::new(policy, 0, freed(&q), 0);
        q.discard(0, 48 * CLUSTER).unwrap();
        q.flush().unwrap();
        let mut requests = 0;
        let mut first_move = None;
        let mut moved = 0;
        for now in 0..20_000u64 {
            if now < 2000 && now % 100 == 0 {
                requests += 1;
            }
            s.observe(now, freed(&q), requests);
            let Some(budget) = s.next_step(now, CLUSTER) else {
                continue;
            };
            let p = q.compact_step(budget / CLUSTER).unwrap();
            if p.moved_clusters > 0 {
                first_move.get_or_insert(now);
                moved += p.moved_clusters * CLUSTER;
                let allowed = rate * (now - first_move.unwrap()) / 1000 + Scheduler::MAX_STEP_BYTES;
                assert!(moved <= allowed, "{moved} bytes moved by {now} ms");
            }
            s.step_done(p.moved_clusters * CLUSTER, CLUSTER, p.done, freed(&q));
            if p.done {
                break;
            }
        }
        let first = first_move.expect("the pass moved clusters");
        assert!(first >= 2900, "moved at {first} ms, before 1 s of silence");
        assert_eq!(s.state(), CompactionState::Idle);
        assert_eq!(s.passes(), 1);
        assert_eq!(moved, 16 * CLUSTER);
        assert_eq!(s.moved_bytes(), moved);
        assert_eq!(q.image_extent(), full - 48 * CLUSTER);
        let mut back = vec![0u8; (64 * CLUSTER) as usize];
        q.read(0, &mut back).unwrap();
        assert!(back[..(48 * CLUSTER) as usize].iter().all(|&b| b == 0));
        assert!(back[(48 * CLUSTER) as usize..] == data[(48 * CLUSTER) as usize..]);
        // The pass's own frees (the old copies) do not start another pass.
        s.observe(30_000, freed(&q), requests);
        assert_eq!(s.state(), CompactionState::Idle);
    }

    #[test]
    fn state_names_are_distinct() {
        for (i, st) in CompactionState::ALL.iter().enumerate() {
            assert_eq!(st.index(), i);
        }
        let names: Vec<_> = CompactionState::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["off", "idle", "waiting", "running"]);
    }
}
