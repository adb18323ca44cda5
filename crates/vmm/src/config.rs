//! The VM configuration: what `pocketvisor run` takes as flags or as a TOML file. It lives in
//! `vmm-api` (shared with the CLI and the handset without KVM); re-exported here.

pub use vmm_api::config::*;

#[cfg(test)]
mod tests {
    /// `vmm_api::limits` mirrors `arch::layout` (which needs KVM): they must agree.
    #[test]
    fn limits_agree_with_the_platform_layout() {
        assert_eq!(
            vmm_api::limits::MIN_MEMORY_MIB,
            arch::layout::MIN_MEMORY >> 20
        );
        assert_eq!(
            vmm_api::limits::MIN_MEMORY_MIB << 20,
            arch::layout::MIN_MEMORY
        );
        assert_eq!(vmm_api::limits::CMDLINE_MAX, arch::layout::CMDLINE_MAX);
    }
}
