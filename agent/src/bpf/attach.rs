//! One pod's program attachments.

use std::path::PathBuf;

/// The pinned bpf_links that attach the programs to one pod's cgroup and netns. Pinned, they stay
/// attached when this value is dropped or the agent dies (the pod fails closed while no agent
/// runs); [`PodAttachment::detach`] takes them out.
pub struct PodAttachment {
    dir: PathBuf,
    /// (program, kernel link id, made by this agent rather than adopted).
    links: Vec<(&'static str, u32, bool)>,
}

impl PodAttachment {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self { dir, links: Vec::new() }
    }

    pub(super) fn push(&mut self, program: &'static str, link_id: u32, created: bool) {
        self.links.push((program, link_id, created));
    }

    /// Unpins the links this agent made (a failed attach): adopted ones stay, so a pod an earlier
    /// agent captured is never left uncaptured by a failed retry.
    pub(super) fn remove_created(&mut self) {
        for (name, _, created) in std::mem::take(&mut self.links) {
            if created {
                let _ = std::fs::remove_file(self.dir.join(name));
            }
        }
    }

    /// The directory holding the pins.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// How many links were adopted from an earlier agent.
    pub fn adopted(&self) -> usize {
        self.links.iter().filter(|(_, _, created)| !created).count()
    }

    /// (program name, kernel link id) of each attachment, for reporting.
    pub fn link_ids(&self) -> Vec<(&'static str, u32)> {
        self.links.iter().map(|(name, id, _)| (*name, *id)).collect()
    }

    /// Detaches every program from the pod: removing the pins releases the links.
    pub fn detach(self) {
        if let Err(e) = super::pins::remove_links(&self.dir) {
            tracing::warn!(error = %e, "detaching a pod's programs");
        }
    }
}
