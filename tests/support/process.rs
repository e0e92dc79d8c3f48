//! Fault injection on a sandbox's processes: signals by process name.

use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use super::Sandbox;

impl Sandbox {
    /// Sends `signal` (`KILL`, `TERM`, `STOP`, `CONT`) to the process `name`.
    pub fn signal(&mut self, name: &str, signal: &str) {
        let process = self
            .processes
            .iter()
            .find(|process| process.name == name)
            .unwrap_or_else(|| panic!("no process named {name}"));
        let status = Command::new("kill")
            .args([format!("-{signal}"), process.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} {name} failed");
        if signal == "KILL" {
            let process = self
                .processes
                .iter_mut()
                .find(|process| process.name == name)
                .expect("process");
            let _ = process.child.wait();
        }
    }

    /// Forgets a process that was killed, so `assert_alive` ignores it.
    pub fn forget(&mut self, name: &str) {
        self.processes.retain(|process| process.name != name);
    }

    /// Waits up to `timeout` for the process `name` to exit and forgets it;
    /// panics if it is still running then.
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let process = self
                .processes
                .iter_mut()
                .find(|process| process.name == name)
                .unwrap_or_else(|| panic!("no process named {name}"));
            if let Some(status) = process.child.try_wait().expect("polling a process") {
                self.forget(name);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{name} still running {timeout:?} after being asked to stop\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
