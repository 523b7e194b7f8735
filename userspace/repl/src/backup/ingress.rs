//! The guest input the primary sent ahead (`Ingress` frames, see [`crate::ingress`]), kept until
//! the epoch that took it in commits: a takeover delivers what is left to the restored VM.

use std::collections::VecDeque;

use ftvm_proto::epoch::decode_output;
use ftvm_proto::EpochId;

/// Most payload bytes kept. Past it new input is not kept (and counted): the backup then lags far
/// behind, and the oldest input, which the next commits need least, is still the most useful.
pub(crate) const RECENT_INGRESS_BYTES: usize = 16 << 20;

/// The frames of `payloads` (each in the HeldOutput layout: held output, and input sent ahead), in
/// order. They were checked on arrival; a payload that fails now is skipped rather than trusted.
pub(crate) fn decoded_frames<'a>(payloads: impl Iterator<Item = &'a [u8]>) -> Vec<Vec<u8>> {
    payloads.filter_map(|p| decode_output(p).ok()).flatten().map(<[u8]>::to_vec).collect()
}

/// What became of an `Ingress` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kept {
    /// Kept for a takeover.
    Yes,
    /// Its epoch is committed already: the standby holds its effect.
    Late,
    /// Over [`RECENT_INGRESS_BYTES`].
    Full,
}

/// The `Ingress` payloads of epochs not committed yet, in arrival order.
#[derive(Debug, Default)]
pub(crate) struct RecentIngress {
    /// Epoch, payload, frames in it.
    payloads: VecDeque<(u64, Vec<u8>, usize)>,
    bytes: usize,
    frames: usize,
}

impl RecentIngress {
    /// Keeps `payload` of `epoch` (checked by the caller: it decodes into `frames` frames), unless
    /// `committed` covers it.
    pub(crate) fn keep(&mut self, epoch: u64, payload: Vec<u8>, frames: usize, committed: Option<EpochId>) -> Kept {
        if committed.is_some_and(|c| epoch <= c.0) {
            return Kept::Late;
        }
        if self.bytes + payload.len() > RECENT_INGRESS_BYTES {
            return Kept::Full;
        }
        self.bytes += payload.len();
        self.frames += frames;
        self.payloads.push_back((epoch, payload, frames));
        Kept::Yes
    }

    /// `epoch` committed: the input it took in is part of the standby now.
    pub(crate) fn committed(&mut self, epoch: EpochId) {
        let (mut bytes, mut frames) = (self.bytes, self.frames);
        self.payloads.retain(|(e, p, n)| {
            let keep = *e > epoch.0;
            if !keep {
                bytes -= p.len();
                frames -= n;
            }
            keep
        });
        (self.bytes, self.frames) = (bytes, frames);
    }

    /// Forgets everything (a new session, or a standby that cannot be resumed).
    pub(crate) fn clear(&mut self) {
        self.payloads.clear();
        self.bytes = 0;
        self.frames = 0;
    }

    /// The frames to deliver at a takeover from `committed`, oldest first.
    pub(crate) fn frames_after(&self, committed: Option<EpochId>) -> Vec<Vec<u8>> {
        let after = |e: &u64| committed.is_none_or(|c| *e > c.0);
        decoded_frames(self.payloads.iter().filter(|(e, ..)| after(e)).map(|(_, p, _)| p.as_slice()))
    }

    /// Frames kept (for status).
    pub(crate) fn frame_count(&self) -> usize {
        self.frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_proto::epoch::encode_output_frame;

    fn payload(frames: &[&[u8]]) -> Vec<u8> {
        let mut p = Vec::new();
        for f in frames {
            encode_output_frame(f, &mut p);
        }
        p
    }

    #[test]
    fn input_is_kept_until_its_epoch_commits() {
        let mut r = RecentIngress::default();
        assert_eq!(r.keep(3, payload(&[b"late"]), 1, Some(EpochId(3))), Kept::Late);
        assert_eq!(r.keep(4, payload(&[b"a", b"b"]), 2, Some(EpochId(3))), Kept::Yes);
        assert_eq!(r.keep(5, payload(&[b"c"]), 1, Some(EpochId(3))), Kept::Yes);
        assert_eq!(r.frame_count(), 3);
        assert_eq!(r.frames_after(Some(EpochId(3))), vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        r.committed(EpochId(4));
        assert_eq!(r.frames_after(Some(EpochId(4))), vec![b"c".to_vec()]);
        // A takeover from an older epoch than the buffer's (cannot happen; still exact).
        assert_eq!(r.frames_after(Some(EpochId(5))), Vec::<Vec<u8>>::new());
        r.committed(EpochId(5));
        assert_eq!((r.frame_count(), r.bytes), (0, 0));
        let big = vec![0u8; RECENT_INGRESS_BYTES + 1];
        assert_eq!(r.keep(9, big, 1, None), Kept::Full);
        assert_eq!(r.keep(9, payload(&[b"d"]), 1, None), Kept::Yes);
        assert_eq!(r.frame_count(), 1);
        r.clear();
        assert!(r.frames_after(None).is_empty());
    }
}
