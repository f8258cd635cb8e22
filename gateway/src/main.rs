//! The `isthmus` binary. Kept synchronous: Pingora's `Server::run` builds its own
//! runtimes and must not be called from inside one.
use std::process::ExitCode;

/// jemalloc: the allocator that measured best on the data plane
/// (`tests/bench/proxy-bench.sh`, docs/performance.md "The floor").
#[cfg(not(feature = "count-allocations"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Built with `--features count-allocations` (for the benchmarks), every call
/// into the allocator is counted; the count is `isthmus_process_allocations_total`.
/// It counts calls, which do not depend on the allocator that serves them, so
/// the counting build wraps the system allocator (stats_alloc can only wrap
/// that one in a `static` on stable Rust).
#[cfg(feature = "count-allocations")]
#[global_allocator]
static GLOBAL: stats_alloc::StatsAlloc<std::alloc::System> = stats_alloc::StatsAlloc::system();

fn main() -> ExitCode {
    #[cfg(feature = "count-allocations")]
    isthmus_gateway::metrics::count_allocations(|| GLOBAL.stats().allocations as u64);
    isthmus_gateway::cli::main()
}
