//! Buffer pools: the hot path's big buffers (file bytes, decoded and resized pixels, batch
//! tensors) go back to a pool when their stage is done with them, so a steady-state run
//! allocates (and page-faults) almost nothing per image. Takes finished buffers, hands on
//! cleared ones with their capacity kept.

use std::sync::Mutex;

/// Free buffers of one element type, shared by every thread of a run.
pub struct BufferPool<T> {
    free: Mutex<Vec<Vec<T>>>,
    /// Most buffers kept; beyond that a returned buffer is dropped, so the pool never holds
    /// more than the pipeline had in flight at once.
    keep: usize,
}

impl<T> BufferPool<T> {
    pub const fn new(keep: usize) -> Self {
        BufferPool {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// An empty buffer that can hold `capacity` elements: a returned one when one is big
    /// enough (the largest otherwise grows once), else a new one.
    pub fn take(&self, capacity: usize) -> Vec<T> {
        let mut buffer = self.pick(capacity);
        buffer.clear();
        buffer.reserve(capacity);
        buffer
    }

    /// A buffer of exactly `len` elements for a caller that overwrites all of them: a reused
    /// buffer keeps its stale contents (only growth is filled), so no time goes to zeroing.
    pub fn take_len(&self, len: usize) -> Vec<T>
    where
        T: Clone + Default,
    {
        let mut buffer = self.pick(len);
        buffer.resize(len, T::default());
        buffer
    }

    /// A free buffer that holds `capacity` (the largest otherwise), or a new empty one.
    fn pick(&self, capacity: usize) -> Vec<T> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let fit = free.iter().position(|b| b.capacity() >= capacity);
        fit.map(|i| free.swap_remove(i))
            .or_else(|| free.pop())
            .unwrap_or_default()
    }

    /// Hands a buffer back for reuse.
    pub fn give(&self, buffer: Vec<T>) {
        if buffer.capacity() == 0 {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.keep {
            free.push(buffer);
        }
    }
}

/// Bytes: source files, decoded and resized RGB8 pixels.
pub static BYTES: BufferPool<u8> = BufferPool::new(64);
/// f32 batch tensors (NCHW) on their way to the encoder and back.
pub static FLOATS: BufferPool<f32> = BufferPool::new(8);
/// f16 batch tensors, for encoders that take float16.
pub static HALVES: BufferPool<half::f16> = BufferPool::new(8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_a_returned_buffer_and_bounds_what_it_keeps() {
        let pool = BufferPool::<u8>::new(2);
        let mut a = pool.take(1000);
        a.extend_from_slice(&[7; 1000]);
        let ptr = a.as_ptr();
        pool.give(a);
        let mut b = pool.take(500);
        assert_eq!(b.as_ptr(), ptr, "the returned buffer is handed out again");
        assert!(b.is_empty() && b.capacity() >= 1000);
        b.extend_from_slice(&[7; 800]);
        pool.give(b);
        let c = pool.take_len(600);
        assert_eq!(
            (c.len(), c[599]),
            (600, 7),
            "take_len keeps stale contents, no zeroing"
        );
        for _ in 0..5 {
            pool.give(vec![0u8; 10]);
        }
        assert_eq!(pool.free.lock().unwrap().len(), 2);
    }
}
