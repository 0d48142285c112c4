//! One pod's program attachments.

use aya::programs::links::FdLink;

/// The bpf_links that attach the programs to one pod's cgroup and netns. They are fd-based links:
/// dropping this value (or the agent dying) detaches every program from the pod.
#[derive(Default)]
pub struct PodAttachment {
    links: Vec<(&'static str, FdLink)>,
}

impl PodAttachment {
    pub(super) fn push(&mut self, program: &'static str, link: FdLink) {
        self.links.push((program, link));
    }

    /// (program name, kernel link id) of each attachment, for reporting.
    pub fn link_ids(&self) -> Vec<(&'static str, u32)> {
        self.links.iter().filter_map(|(name, link)| Some((*name, link.info().ok()?.id()))).collect()
    }
}
