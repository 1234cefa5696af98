//! The calling thread's scheduling policy: `SCHED_FIFO` at a priority, `SCHED_BATCH`, or
//! back to `SCHED_OTHER`. The data plane switches between them as its load changes (see
//! [`crate::io`]), so the thread keeps its nice value across the switches
//! (`pthread_setschedparam` leaves it as it was, where the `thread-priority` crate would
//! set one). One of the crate's two unsafe calls (the other: `underlay`).

#![allow(unsafe_code)]

use std::io;

/// Puts the calling thread under `SCHED_FIFO` at `priority` (1..=99).
pub fn run_fifo(priority: u8) -> io::Result<()> {
    set(libc::SCHED_FIFO, i32::from(priority))
}

/// Puts the calling thread under `SCHED_BATCH` (its nice value unchanged): ordinary
/// scheduling, except that its wake-ups do not pre-empt the running task (any thread may).
pub fn run_batch() -> io::Result<()> {
    set(libc::SCHED_BATCH, 0)
}

/// Puts the calling thread back under ordinary scheduling (`SCHED_OTHER`, its nice value
/// unchanged).
pub fn run_ordinary() -> io::Result<()> {
    set(libc::SCHED_OTHER, 0)
}

fn set(policy: libc::c_int, priority: libc::c_int) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `pthread_self()` is the calling thread, alive for the call; `param` is a
    // valid `sched_param` that outlives it, and it is only read.
    match unsafe { libc::pthread_setschedparam(libc::pthread_self(), policy, &param) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_goes_back_to_ordinary_scheduling_with_its_nice_value() {
        std::thread::spawn(|| {
            // Ordinary scheduling is always allowed; SCHED_FIFO only with CAP_SYS_NICE or
            // an RLIMIT_RTPRIO, so its refusal is an answer too, but a clear one.
            // A nice value of its own (raising it needs no privilege), to see it kept.
            let nice = (rustix::process::getpriority_process(None).expect("nice") + 1).min(19);
            rustix::process::setpriority_process(None, nice).expect("a higher nice value");
            match run_fifo(1) {
                Ok(()) => {}
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
            }
            run_ordinary().expect("back to SCHED_OTHER");
            assert_eq!(
                rustix::process::getpriority_process(None).expect("nice"),
                nice
            );
            // Batch and back need no privilege, and keep it too.
            run_batch().expect("SCHED_BATCH");
            assert_eq!(
                rustix::process::getpriority_process(None).expect("nice"),
                nice
            );
            run_ordinary().expect("back to SCHED_OTHER from SCHED_BATCH");
            assert!(
                run_fifo(0).is_err(),
                "priority 0 is not a SCHED_FIFO priority"
            );
        })
        .join()
        .expect("thread");
    }
}
