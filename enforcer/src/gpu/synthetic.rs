//! A scripted [`GpuSource`]: each call returns the next recorded frame.
//! Tests drive the guard and the cap controller with it; a recording of a
//! real NVML session can be replayed the same way.

use std::collections::VecDeque;

use super::source::{DeviceSample, GpuError, GpuSource, ProcessSample};

/// One recorded control tick: what `devices()` and `processes()` answered.
#[derive(Debug, Clone)]
pub struct Frame {
    pub devices: Result<Vec<DeviceSample>, GpuError>,
    pub processes: Result<Vec<ProcessSample>, GpuError>,
}

/// Replays [`Frame`]s in order; after the last one it repeats it, so a test
/// can run longer than its script without a panic.
#[derive(Debug, Clone, Default)]
pub struct SyntheticSource {
    frames: VecDeque<Frame>,
    last: Option<Frame>,
    /// The `since_us` each `processes()` call was given, for tests that
    /// check the caller advances its timestamp.
    pub since_seen: Vec<u64>,
}

impl SyntheticSource {
    pub fn new(frames: impl IntoIterator<Item = Frame>) -> Self {
        SyntheticSource {
            frames: frames.into_iter().collect(),
            last: None,
            since_seen: Vec::new(),
        }
    }

    pub fn push(&mut self, frame: Frame) {
        self.frames.push_back(frame);
    }

    fn current(&mut self) -> Option<&Frame> {
        if self.last.is_none() {
            self.last = self.frames.pop_front();
        }
        self.last.as_ref()
    }

    /// Moves to the next frame (the guard calls `devices()` then
    /// `processes()` once per tick, so `processes()` advances).
    fn advance(&mut self) {
        if let Some(next) = self.frames.pop_front() {
            self.last = Some(next);
        }
    }
}

impl GpuSource for SyntheticSource {
    fn devices(&mut self) -> Result<Vec<DeviceSample>, GpuError> {
        self.current().map_or(Ok(Vec::new()), |f| f.devices.clone())
    }

    fn processes(&mut self, since_us: u64) -> Result<Vec<ProcessSample>, GpuError> {
        self.since_seen.push(since_us);
        let out = self.current().map_or(Ok(Vec::new()), |f| {
            f.processes.clone().map(|ps| {
                ps.into_iter()
                    .map(|mut p| {
                        p.sm_samples.retain(|&(ts, _)| ts > since_us);
                        p
                    })
                    .collect()
            })
        });
        self.advance();
        out
    }
}
