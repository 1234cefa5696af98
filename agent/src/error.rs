//! Why the agent stops, and the one mapping of that to exit codes.

use asmn_shared::wire::msg::RefusalCode;

/// Exit code: Sec-EM refused this instance for good (wrong image, unknown, revoked,
/// quarantined). The service manager must not restart it.
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: bad configuration, bundle or chain state. Restarting does not help.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code: a device, socket or network error. Restarting may help.
pub const EXIT_RUNTIME: u8 = 3;

/// An error of the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Sec-EM refused a request.
    #[error("Sec-EM refused this instance ({code:?}): {message}")]
    Refused {
        /// The typed reason.
        code: RefusalCode,
        /// Sec-EM's message.
        message: String,
    },
    /// The configuration, the bundle or the saved chain state is wrong.
    #[error("{0}")]
    Config(String),
    /// The TUN device or the underlay socket.
    #[error("{0}")]
    Device(String),
    /// Anything else (the network, Sec-EM unreachable, a task that failed).
    #[error("{0}")]
    Other(String),
}

impl AgentError {
    /// Whether this ends the agent for good: a refusal that no retry can change. Every
    /// other error (Sec-EM unavailable or unreachable, a request that timed out) is
    /// retried, and the tunnels keep running meanwhile.
    pub fn is_terminal(&self) -> bool {
        match self {
            AgentError::Refused { code, .. } => matches!(
                code,
                RefusalCode::WrongMeasurement
                    | RefusalCode::UnknownInstance
                    | RefusalCode::Revoked
                    | RefusalCode::Quarantined
            ),
            AgentError::Config(_) => true,
            AgentError::Device(_) | AgentError::Other(_) => false,
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Refused { .. } if self.is_terminal() => EXIT_REFUSED,
            AgentError::Config(_) => EXIT_CONFIG,
            _ => EXIT_RUNTIME,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_final_refusals_and_bad_configuration_are_terminal() {
        let refused = |code| AgentError::Refused {
            code,
            message: String::new(),
        };
        for code in [
            RefusalCode::WrongMeasurement,
            RefusalCode::UnknownInstance,
            RefusalCode::Revoked,
            RefusalCode::Quarantined,
        ] {
            assert!(refused(code).is_terminal(), "{code:?}");
            assert_eq!(refused(code).exit_code(), EXIT_REFUSED);
        }
        for code in [
            RefusalCode::Unavailable,
            RefusalCode::SkipTooFar,
            RefusalCode::Replayed,
            RefusalCode::NotAuthorized,
        ] {
            assert!(!refused(code).is_terminal(), "{code:?}");
        }
        assert_eq!(AgentError::Config("x".into()).exit_code(), EXIT_CONFIG);
        assert_eq!(AgentError::Other("x".into()).exit_code(), EXIT_RUNTIME);
        assert_eq!(AgentError::Device("x".into()).exit_code(), EXIT_RUNTIME);
    }
}
