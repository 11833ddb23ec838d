//! The process's limit on open files, which bounds how many clients it can serve.
//!
//! Every connection is a file descriptor: with the usual soft default of 1024 a relay stops
//! accepting at about a thousand clients (the kernel still completes their TCP handshakes, so
//! they wait with nothing happening). Raising the soft limit up to the hard one needs no
//! privilege, so the relay does it at start.

/// Raises this process's soft limit on open files to its hard limit, and returns the limit now
/// in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads into the struct.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        // Start from a low soft limit, as a shell or service manager would give us.
        let low = libc::rlimit {
            rlim_cur: limit.rlim_max.min(256),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: lowering the soft limit within the hard one.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        let now = raise_open_files_limit().expect("raise");
        assert_eq!(now, limit.rlim_max, "soft limit = hard limit");
    }
}
