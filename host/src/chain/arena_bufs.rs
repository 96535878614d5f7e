//! Arena blocks lent to plugins: a committed chunk is a put's source, a staged block a get's
//! destination. The chain joins the two layers here, so the hot cache knows nothing of the binding.

use crate::cache::{ChunkHandle, StagedBlock};
use crate::plugin::{DstBuf, SrcBuf};

impl SrcBuf for ChunkHandle {
    fn bytes(&self) -> &[u8] {
        ChunkHandle::bytes(self)
    }
}

impl DstBuf for StagedBlock {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}
