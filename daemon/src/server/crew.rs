//! The server's threads. A request crosses no thread on its way from the
//! socket to the device and back: the thread running the event loop, once
//! it has read a request, runs the device command itself. Meanwhile the
//! loop is *down*: no thread runs it. A command that ends quickly (a
//! healthy device answers well within a millisecond) finds the loop where
//! it left it and goes on with it; no other thread is woken. One that runs
//! longer than [`RESCUE_AFTER`] is rescued: a standby thread, asleep on a
//! timerfd, takes the loop over and serves every other client, and the
//! slow command's thread stays with its device. So a hung device holds one
//! thread, and delays the other clients by at most twice `RESCUE_AFTER`,
//! once. The timer is not set for every command: a command that starts
//! while it is due at least `RESCUE_AFTER` later leaves it as it is, so a
//! busy server sets it about once per `RESCUE_AFTER` (each setting can cost
//! a timer reprogramming, which is dear on virtual machines).
//!
//! That is for a lone command on a quiet server, the common case (a guest's
//! cluster software issues one PR command at a time). When one turn of the
//! loop reads several requests, or other commands started less than
//! `RESCUE_AFTER` ago are still running, the loop stays on its thread and
//! idle threads (started as needed) run the commands, one each. A command
//! running longer is slow or hung, wherever it runs: it holds its thread
//! but is no longer load, so a hung device does not send every other
//! client's command through a hand-off for as long as it hangs. Commands
//! running at once are capped (`max_workers`): past the cap they wait in a
//! queue for the first thread that finishes, and the loop goes on.
//!
//! A panic on a thread of the crew outside a command (the server catches
//! the commands' own) is a bug in the loop or the crew: their state can no
//! longer be trusted. The crew logs it at error level and [`run`] returns
//! an error, so the daemon ends with a non-zero exit status (and systemd
//! restarts it) rather than keep its socket open with nobody serving it.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long the loop stays down while its thread runs a command before the
/// standby thread takes it over: at least this, at most twice this.
pub const RESCUE_AFTER: Duration = Duration::from_millis(1);

/// How long an idle thread waits for work before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(30);

/// An event loop the crew runs, one thread at a time.
pub trait Loop: Send + 'static {
    type Output: Send + 'static;
    /// Run until there are commands to run (`Jobs`, never empty) or the
    /// loop is over (`Done`). A turn first takes in what commands that ended
    /// meanwhile reported, without waiting.
    fn turn(&mut self) -> Turn<Self::Output>;
    /// Makes a turn waiting for events return: called when a command ended
    /// while another thread had the loop.
    fn waker(&self) -> Arc<dyn Fn() + Send + Sync>;
    /// Another thread takes the loop over from a thread that is running a
    /// command (a rescue); told before its next turn.
    fn taken_over(&mut self) {}
}

pub enum Turn<T> {
    Jobs(Vec<Job>),
    Done(T),
}

struct State<L: Loop> {
    /// The loop, while it is down.
    down: Option<L>,
    /// Commands waiting for a thread.
    queue: VecDeque<Job>,
    /// When each running command started, in no order. Those that have
    /// run for `rescue_after` are slow or hung, wherever they run (on a
    /// thread whose loop was rescued, or on one of their own): they hold a
    /// thread but no longer count as load.
    started: Vec<Instant>,
    /// Threads waiting on `work`.
    idle: usize,
    /// A thread is asleep on the timer.
    standby: bool,
    /// When the timer fires, if it is set (and not yet read).
    due: Option<Instant>,
    /// Threads started that have not yet looked for work.
    starting: usize,
    /// What the loop returned, for `run`.
    done: Option<L::Output>,
    /// Why a thread of the crew panicked, for `run`.
    panicked: Option<String>,
    finished: bool,
}

struct Shared<L: Loop> {
    state: Mutex<State<L>>,
    /// Idle threads wait here.
    work: Condvar,
    /// `run` waits here for the end of the loop.
    over: Condvar,
    /// Due between `rescue_after` and twice that after the start of any
    /// command run while the loop is down; left set when the loop's thread
    /// takes the loop back. The standby thread waits on it.
    timer: TimerFd,
    wake: Arc<dyn Fn() + Send + Sync>,
    max_workers: usize,
    rescue_after: Duration,
}

impl<L: Loop> Shared<L> {
    fn lock(&self) -> MutexGuard<'_, State<L>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Set the timer to fire `after` from now; `now` is read before, so
    /// `due` is never later than the expiry.
    fn arm(&self, st: &mut State<L>, now: Instant, after: Duration) {
        let when = Expiration::OneShot(TimeSpec::from_duration(after));
        match self.timer.set(when, TimerSetTimeFlags::empty()) {
            Ok(()) => st.due = Some(now + after),
            Err(e) => {
                st.due = None;
                log::error!("cannot arm the loop's rescue timer: {e}");
            }
        }
    }

    /// Make sure the timer fires between `rescue_after` and twice that from
    /// now. It is set again only when it would fire sooner than
    /// `rescue_after` (or has fired): the timer and `Instant` both count
    /// CLOCK_MONOTONIC, so a timer that has fired is always set again.
    fn arm_for_command(&self, st: &mut State<L>, now: Instant) {
        let keep = st.due.is_some_and(|due| due >= now + self.rescue_after);
        if !keep {
            self.arm(st, now, 2 * self.rescue_after);
        }
    }

    /// No command has been running for less than `rescue_after`.
    fn quiet(&self, st: &State<L>, now: Instant) -> bool {
        st.started
            .iter()
            .all(|&t| now.saturating_duration_since(t) >= self.rescue_after)
    }

    fn disarm(&self, st: &mut State<L>) {
        // Disarming also clears a past expiry not yet read.
        let _ = self.timer.unset();
        st.due = None;
    }
}

/// Run `lp` until it is done, with at most `max_workers` commands at once;
/// the calling thread only waits. Fails if no thread can be started.
pub fn run<L: Loop>(lp: L, max_workers: usize) -> std::io::Result<L::Output> {
    run_with(lp, max_workers, RESCUE_AFTER)
}

fn run_with<L: Loop>(
    lp: L,
    max_workers: usize,
    rescue_after: Duration,
) -> std::io::Result<L::Output> {
    let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_CLOEXEC)?;
    let shared = Arc::new(Shared {
        wake: lp.waker(),
        state: Mutex::new(State {
            down: None,
            queue: VecDeque::new(),
            started: Vec::new(),
            idle: 0,
            standby: false,
            due: None,
            starting: 0,
            done: None,
            panicked: None,
            finished: false,
        }),
        work: Condvar::new(),
        over: Condvar::new(),
        timer,
        max_workers: max_workers.max(1),
        rescue_after,
    });
    let mut st = shared.lock();
    spawn(&shared, &mut st, Some(lp))?;
    loop {
        if let Some(why) = st.panicked.take() {
            return Err(std::io::Error::other(format!(
                "a thread of the event loop panicked (a bug in reservd): {why}"
            )));
        }
        if let Some(out) = st.done.take() {
            return Ok(out);
        }
        st = shared.over.wait(st).unwrap_or_else(|e| e.into_inner());
    }
}

/// The text of a panic's payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// A thread of the crew panicked: the crew stops and `run` returns an
/// error. The loop, on the stack of the thread that panicked if it ran
/// there, has been dropped by the unwinding.
fn panicked<L: Loop>(shared: &Shared<L>, why: String) {
    log::error!("a thread of the event loop panicked (a bug in reservd): {why}; stopping");
    let mut st = shared.lock();
    st.panicked.get_or_insert(why);
    st.finished = true;
    shared.over.notify_all();
    shared.work.notify_all();
    // Wake the standby thread so that it leaves.
    shared.arm(&mut st, Instant::now(), Duration::from_nanos(1));
}

/// Start one more thread; the caller holds the lock.
fn spawn<L: Loop>(
    shared: &Arc<Shared<L>>,
    st: &mut State<L>,
    first: Option<L>,
) -> std::io::Result<()> {
    let s = Arc::clone(shared);
    std::thread::Builder::new()
        .name("reservd-loop".into())
        .spawn(move || {
            let served =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(&s, first)));
            if let Err(p) = served {
                panicked(&s, panic_message(p.as_ref()));
            }
        })?;
    st.starting += 1;
    Ok(())
}

/// A thread of the crew. The first one starts with the loop; the others
/// start as runners of queued commands or as the standby.
fn serve<L: Loop>(shared: &Arc<Shared<L>>, first: Option<L>) {
    let mut st = shared.lock();
    st.starting -= 1;
    let mut loop_first = first.is_some();
    if let Some(lp) = first {
        st = lead(shared, st, lp);
    }
    // A thread whose command just ended, or whose timer fired, takes a
    // loop that is down before anything else. A new or woken thread runs a
    // queued command, or becomes the standby, and leaves the loop to the
    // thread that put it down (or to the rescue).
    loop {
        if st.finished {
            break;
        }
        if loop_first && st.down.is_some() {
            st = take_loop(shared, st);
            continue;
        }
        // The loop is down with nobody to rescue it: that comes first.
        let rescue_needed = st.down.is_some() && !st.standby;
        if !rescue_needed && st.started.len() < shared.max_workers && !st.queue.is_empty() {
            let job = st.queue.pop_front().expect("checked");
            st = run_job(shared, st, job, Instant::now());
            loop_first = true;
            continue;
        }
        if !st.standby {
            st = stand_by(shared, st);
            loop_first = true;
            continue;
        }
        st.idle += 1;
        let (g, wait) = shared
            .work
            .wait_timeout(st, IDLE_EXIT)
            .unwrap_or_else(|e| e.into_inner());
        st = g;
        st.idle -= 1;
        loop_first = false;
        if wait.timed_out() && st.down.is_none() && st.queue.is_empty() {
            break;
        }
    }
}

/// Take over the loop that another thread put down to run a command (the
/// rescue), and run it; the caller holds the lock.
fn take_loop<'a, L: Loop>(
    shared: &'a Arc<Shared<L>>,
    mut st: MutexGuard<'a, State<L>>,
) -> MutexGuard<'a, State<L>> {
    let mut lp = st.down.take().expect("the loop is down");
    shared.disarm(&mut st);
    lp.taken_over();
    lead(shared, st, lp)
}

/// Sleep on the timer as the standby until it fires; the caller holds the
/// lock, and gets it back.
fn stand_by<'a, L: Loop>(
    shared: &'a Arc<Shared<L>>,
    mut st: MutexGuard<'a, State<L>>,
) -> MutexGuard<'a, State<L>> {
    st.standby = true;
    loop {
        drop(st);
        let _ = shared.timer.wait();
        st = shared.lock();
        // An expiry read just before the loop's thread set the timer again,
        // for a command that has only started, is stale: that command has
        // not run long enough to be rescued. Sleep on until the new one.
        let stale = st.due.is_some_and(|due| due > Instant::now());
        if st.finished || !stale {
            break;
        }
    }
    st.standby = false;
    st
}

/// Run one command, started `now`; the caller holds the lock, and gets it
/// back.
fn run_job<'a, L: Loop>(
    shared: &'a Arc<Shared<L>>,
    mut st: MutexGuard<'a, State<L>>,
    job: Job,
    now: Instant,
) -> MutexGuard<'a, State<L>> {
    st.started.push(now);
    drop(st);
    job();
    let mut st = shared.lock();
    if let Some(i) = st.started.iter().position(|&t| t == now) {
        st.started.swap_remove(i);
    }
    if st.down.is_none() && !st.finished {
        // Another thread has the loop: tell it the command ended.
        (shared.wake)();
    }
    st
}

/// Run the loop. A lone command runs on this thread, the loop down
/// meanwhile with a standby ready to rescue it: this thread goes on with
/// the loop when the command ends, or returns if the loop was rescued.
/// Commands that come with others go to other threads. Returns the lock.
fn lead<'a, L: Loop>(
    shared: &'a Arc<Shared<L>>,
    mut st: MutexGuard<'a, State<L>>,
    mut lp: L,
) -> MutexGuard<'a, State<L>> {
    loop {
        drop(st);
        let turn = lp.turn();
        st = shared.lock();
        let jobs = match turn {
            Turn::Done(out) => {
                st.done = Some(out);
                st.finished = true;
                shared.over.notify_all();
                shared.work.notify_all();
                // Wake the standby thread so that it leaves.
                shared.arm(&mut st, Instant::now(), Duration::from_nanos(1));
                drop(st);
                drop(lp);
                return shared.lock();
            }
            Turn::Jobs(jobs) => jobs,
        };
        st.queue.extend(jobs);
        if st.started.len() >= shared.max_workers {
            // At the cap: the commands wait, the loop goes on here.
            continue;
        }
        let now = Instant::now();
        if st.queue.len() == 1 && shared.quiet(&st, now) {
            // A lone command on a quiet server (slow and hung commands
            // aside): run it on this thread, with a standby ready to rescue
            // the loop.
            let mine = st.queue.pop_front().expect("one job");
            if !st.standby {
                if st.idle > 0 {
                    shared.work.notify_one();
                } else if st.starting == 0 {
                    if let Err(e) = spawn(shared, &mut st, None) {
                        log::error!("cannot start a server thread: {e}");
                    }
                }
            }
            st.down = Some(lp);
            shared.arm_for_command(&mut st, now);
            st = run_job(shared, st, mine, now);
            match st.down.take() {
                Some(back) => {
                    // The loop waited for this thread: go on with it. The
                    // timer stays set: if it fires before the next command,
                    // the standby finds the loop held and sleeps on.
                    lp = back;
                    continue;
                }
                // Rescued: the loop goes on elsewhere.
                None => return st,
            }
        }
        // Busy: the loop stays on this thread, other threads run the
        // commands (one each, as many as may start now).
        let startable = st.queue.len().min(shared.max_workers - st.started.len());
        let mut available = st.idle + st.starting;
        while available < startable {
            if let Err(e) = spawn(shared, &mut st, None) {
                log::error!("cannot start a server thread: {e}");
                break;
            }
            available += 1;
        }
        for _ in 0..startable.min(st.idle) {
            shared.work.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::time::Instant;

    /// A loop fed by a channel: each message is a batch of commands; `None`
    /// ends it. It counts its turns and notes the thread of the last turn
    /// that returned commands.
    struct Fed {
        rx: Receiver<Option<Vec<Job>>>,
        turns: Arc<AtomicUsize>,
        turn_thread: TurnThread,
    }

    impl Loop for Fed {
        type Output = &'static str;
        fn turn(&mut self) -> Turn<&'static str> {
            self.turns.fetch_add(1, Ordering::SeqCst);
            match self.rx.recv() {
                Ok(Some(jobs)) => {
                    *self.turn_thread.lock().unwrap() = Some(std::thread::current().id());
                    Turn::Jobs(jobs)
                }
                _ => Turn::Done("over"),
            }
        }
        fn waker(&self) -> Arc<dyn Fn() + Send + Sync> {
            Arc::new(|| {})
        }
    }

    type Feed = Sender<Option<Vec<Job>>>;
    type TurnThread = Arc<Mutex<Option<std::thread::ThreadId>>>;

    /// A `Fed` loop run by a crew: its feed, its turn count, the thread of
    /// its last turn, and the crew's thread.
    struct Crew {
        tx: Feed,
        turns: Arc<AtomicUsize>,
        turn_thread: TurnThread,
        h: std::thread::JoinHandle<&'static str>,
    }

    fn start_with(max_workers: usize, rescue_after: Duration) -> Crew {
        let (tx, rx) = channel();
        let turns = Arc::new(AtomicUsize::new(0));
        let turn_thread = Arc::new(Mutex::new(None));
        let lp = Fed {
            rx,
            turns: Arc::clone(&turns),
            turn_thread: Arc::clone(&turn_thread),
        };
        let h = std::thread::spawn(move || run_with(lp, max_workers, rescue_after).unwrap());
        Crew {
            tx,
            turns,
            turn_thread,
            h,
        }
    }

    fn start(max_workers: usize) -> (Feed, std::thread::JoinHandle<&'static str>) {
        let c = start_with(max_workers, RESCUE_AFTER);
        (c.tx, c.h)
    }

    /// Also returns the number of turns the loop has begun.
    fn start_counted(
        max_workers: usize,
    ) -> (
        Feed,
        std::thread::JoinHandle<&'static str>,
        Arc<AtomicUsize>,
    ) {
        let c = start_with(max_workers, RESCUE_AFTER);
        (c.tx, c.h, c.turns)
    }

    fn job(f: impl FnOnce() + Send + 'static) -> Job {
        Box::new(f)
    }

    /// A crew of at most 4 with `rescue_after`: its feed, where it notes
    /// the thread of each turn, and the crew's thread.
    fn start_noting(
        rescue_after: Duration,
    ) -> (Feed, TurnThread, std::thread::JoinHandle<&'static str>) {
        let c = start_with(4, rescue_after);
        (c.tx, c.turn_thread, c.h)
    }

    #[test]
    fn the_thread_that_reads_a_command_runs_it() {
        // No rescue within the test: quick commands never hand the loop over.
        let (tx, turn_thread, h) = start_noting(Duration::from_secs(30));
        let (done_tx, done_rx) = channel();
        let mut threads = std::collections::HashSet::new();
        for _ in 0..10 {
            let (t, d) = (Arc::clone(&turn_thread), done_tx.clone());
            tx.send(Some(vec![job(move || {
                let read_by = t.lock().unwrap().expect("noted");
                let me = std::thread::current().id();
                d.send((read_by == me, me)).unwrap();
            })]))
            .unwrap();
            let (same, ran_on) = done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert!(
                same,
                "a command ran on another thread than the one that read it"
            );
            threads.insert(ran_on);
        }
        // The loop came back to the same thread every time.
        assert_eq!(threads.len(), 1);
        tx.send(None).unwrap();
        h.join().unwrap();
    }

    /// Ten lone commands, one at a time, each run by the thread whose turn
    /// read it.
    fn assert_lone_commands_run_where_read(tx: &Feed, turn_thread: &TurnThread) {
        let (done_tx, done_rx) = channel();
        for _ in 0..10 {
            let (t, d) = (Arc::clone(turn_thread), done_tx.clone());
            tx.send(Some(vec![job(move || {
                let read_by = t.lock().unwrap().expect("noted");
                d.send(read_by == std::thread::current().id()).unwrap();
            })]))
            .unwrap();
            let same = done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert!(same, "handed to another thread while a command hangs");
        }
    }

    #[test]
    fn a_hung_command_does_not_stop_the_next_ones_running_where_read() {
        let (tx, turn_thread, h) = start_noting(Duration::from_millis(5));
        let (gate_tx, gate_rx) = channel::<()>();
        tx.send(Some(vec![job(move || {
            let _ = gate_rx.recv();
        })]))
        .unwrap();
        assert_lone_commands_run_where_read(&tx, &turn_thread);
        gate_tx.send(()).unwrap();
        tx.send(None).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn a_command_hung_on_another_thread_does_not_stop_the_next_ones_running_where_read() {
        let r = Duration::from_millis(5);
        let (tx, turn_thread, h) = start_noting(r);
        // Read in one turn with another, the hanging command runs on a
        // thread of its own, not on the loop's: it is never rescued.
        let (gate_tx, gate_rx) = channel::<()>();
        let (done_tx, done_rx) = channel();
        tx.send(Some(vec![
            job(move || {
                let _ = gate_rx.recv();
            }),
            job(move || done_tx.send(()).unwrap()),
        ]))
        .unwrap();
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // Once it has run for a rescue delay, it no longer counts as load.
        std::thread::sleep(2 * r);
        assert_lone_commands_run_where_read(&tx, &turn_thread);
        gate_tx.send(()).unwrap();
        tx.send(None).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn a_slow_command_is_rescued_after_one_to_two_rescue_delays() {
        let r = Duration::from_millis(200);
        let (tx, _, h) = start_noting(r);
        let (done_tx, done_rx) = channel();
        // A quick command sets the timer (due in 2r); half a delay before
        // it is due, a command that blocks starts, and one behind it that
        // runs once the loop is rescued: not at the old due time.
        let d = done_tx.clone();
        tx.send(Some(vec![job(move || d.send(()).unwrap())]))
            .unwrap();
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        std::thread::sleep(r * 3 / 2);
        let (gate_tx, gate_rx) = channel::<()>();
        let start = Instant::now();
        tx.send(Some(vec![job(move || {
            let _ = gate_rx.recv();
        })]))
        .unwrap();
        let d = done_tx.clone();
        tx.send(Some(vec![job(move || d.send(()).unwrap())]))
            .unwrap();
        let answered = done_rx.recv_timeout(Duration::from_secs(10));
        let waited = start.elapsed();
        gate_tx.send(()).unwrap();
        tx.send(None).unwrap();
        h.join().unwrap();
        assert!(answered.is_ok(), "the loop was never rescued");
        assert!(waited >= r, "rescued after {waited:?}, before {r:?}");
        assert!(
            waited < 2 * r + Duration::from_millis(300),
            "rescued only after {waited:?}"
        );
    }

    /// A loop that counts its rescues, fed like [`Fed`].
    struct Counted {
        fed: Fed,
        rescues: Arc<AtomicUsize>,
    }

    impl Loop for Counted {
        type Output = &'static str;
        fn turn(&mut self) -> Turn<&'static str> {
            self.fed.turn()
        }
        fn waker(&self) -> Arc<dyn Fn() + Send + Sync> {
            self.fed.waker()
        }
        fn taken_over(&mut self) {
            self.rescues.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_loop_is_told_of_each_rescue_and_only_of_those() {
        let (tx, rx) = channel();
        let rescues = Arc::new(AtomicUsize::new(0));
        let lp = Counted {
            fed: Fed {
                rx,
                turns: Arc::new(AtomicUsize::new(0)),
                turn_thread: Arc::new(Mutex::new(None)),
            },
            rescues: Arc::clone(&rescues),
        };
        let h = std::thread::spawn(move || run_with(lp, 4, Duration::from_millis(50)).unwrap());
        // Quick commands: the loop stays with the thread that read them.
        let (done_tx, done_rx) = channel();
        for _ in 0..5 {
            let d = done_tx.clone();
            tx.send(Some(vec![job(move || d.send(()).unwrap())]))
                .unwrap();
            done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        assert_eq!(rescues.load(Ordering::SeqCst), 0);
        // A command that blocks: the standby rescues the loop, once.
        let (gate_tx, gate_rx) = channel::<()>();
        tx.send(Some(vec![job(move || {
            let _ = gate_rx.recv();
        })]))
        .unwrap();
        let d = done_tx.clone();
        tx.send(Some(vec![job(move || d.send(()).unwrap())]))
            .unwrap();
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(rescues.load(Ordering::SeqCst), 1);
        gate_tx.send(()).unwrap();
        tx.send(None).unwrap();
        assert_eq!(h.join().unwrap(), "over");
    }

    #[test]
    fn a_blocked_command_does_not_stall_the_loop() {
        let (tx, h) = start(8);
        let (gate_tx, gate_rx) = channel::<()>();
        let (done_tx, done_rx) = channel();
        tx.send(Some(vec![job(move || {
            let _ = gate_rx.recv();
        })]))
        .unwrap();
        let d = done_tx.clone();
        tx.send(Some(vec![job(move || d.send(2).unwrap())]))
            .unwrap();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)), Ok(2));
        gate_tx.send(()).unwrap();
        tx.send(None).unwrap();
        assert_eq!(h.join().unwrap(), "over");
    }

    #[test]
    fn a_batch_runs_in_parallel() {
        let (tx, h) = start(8);
        // Four commands that each wait for all four to have started.
        let started = Arc::new(AtomicUsize::new(0));
        let (done_tx, done_rx) = channel();
        let jobs = (0..4)
            .map(|i| {
                let (s, d) = (Arc::clone(&started), done_tx.clone());
                job(move || {
                    s.fetch_add(1, Ordering::SeqCst);
                    let t = Instant::now();
                    while s.load(Ordering::SeqCst) < 4 && t.elapsed() < Duration::from_secs(5) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    d.send((i, s.load(Ordering::SeqCst))).unwrap();
                })
            })
            .collect();
        tx.send(Some(jobs)).unwrap();
        for _ in 0..4 {
            let (_, seen) = done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(seen, 4);
        }
        tx.send(None).unwrap();
        assert_eq!(h.join().unwrap(), "over");
    }

    #[test]
    fn commands_beyond_the_cap_wait_their_turn_and_the_loop_goes_on() {
        let (tx, h, turns) = start_counted(2);
        let (gate_tx, gate_rx) = channel::<()>();
        let gate_rx = Arc::new(Mutex::new(gate_rx));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (done_tx, done_rx) = channel();
        for i in 0..4 {
            let (g, d, r, m) = (
                Arc::clone(&gate_rx),
                done_tx.clone(),
                Arc::clone(&running),
                Arc::clone(&most),
            );
            tx.send(Some(vec![job(move || {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                let _ = g.lock().unwrap().recv();
                r.fetch_sub(1, Ordering::SeqCst);
                d.send(i).unwrap();
            })]))
            .unwrap();
        }
        // The loop still takes turns while two commands hang and two wait.
        let (ping_tx, ping_rx) = channel();
        let p = ping_tx.clone();
        let t = Instant::now();
        while running.load(Ordering::SeqCst) < 2 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        tx.send(Some(vec![job(move || p.send(()).unwrap())]))
            .unwrap();
        // Five batches taken: the loop is on its sixth turn, waiting.
        let t = Instant::now();
        while turns.load(Ordering::SeqCst) < 6 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(turns.load(Ordering::SeqCst), 6, "the loop stalled");
        assert_eq!(running.load(Ordering::SeqCst), 2);
        for _ in 0..4 {
            gate_tx.send(()).unwrap();
        }
        let mut got: Vec<i32> = (0..4)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3]);
        ping_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            most.load(Ordering::SeqCst) <= 2,
            "{} at once",
            most.load(Ordering::SeqCst)
        );
        tx.send(None).unwrap();
        assert_eq!(h.join().unwrap(), "over");
    }

    #[test]
    fn idle_threads_are_reused() {
        let (tx, h) = start(8);
        let (done_tx, done_rx) = channel();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let d = done_tx.clone();
            tx.send(Some(vec![job(move || {
                d.send(std::thread::current().id()).unwrap()
            })]))
            .unwrap();
            seen.insert(done_rx.recv_timeout(Duration::from_secs(5)).unwrap());
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(seen.len() <= 2, "{} threads", seen.len());
        tx.send(None).unwrap();
        assert_eq!(h.join().unwrap(), "over");
    }

    /// A loop whose turn panics.
    struct Panics {
        after: Option<Job>,
    }

    impl Loop for Panics {
        type Output = ();
        fn turn(&mut self) -> Turn<()> {
            match self.after.take() {
                Some(job) => Turn::Jobs(vec![job]),
                None => panic!("a bug in the loop"),
            }
        }
        fn waker(&self) -> Arc<dyn Fn() + Send + Sync> {
            Arc::new(|| {})
        }
    }

    /// `run(lp)`, which must return within 10 s.
    fn run_bounded(lp: Panics) -> std::io::Result<()> {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let _ = tx.send(run(lp, 4));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("run returns when the loop's thread panics")
    }

    #[test]
    fn a_panic_in_the_loop_ends_run_with_an_error() {
        let e = run_bounded(Panics { after: None }).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a thread of the event loop panicked (a bug in reservd): a bug in the loop"
        );
        // The same after a lone command ran on the loop's thread.
        let ran = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&ran);
        let lp = Panics {
            after: Some(job(move || {
                r.fetch_add(1, Ordering::SeqCst);
            })),
        };
        let e = run_bounded(lp).unwrap_err();
        assert!(e.to_string().ends_with("a bug in the loop"), "{e}");
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
