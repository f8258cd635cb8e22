//! The `isthmus` binary. Kept synchronous: Pingora's `Server::run` builds its own
//! runtimes and must not be called from inside one.
use std::process::ExitCode;

fn main() -> ExitCode {
    isthmus_gateway::cli::main()
}
