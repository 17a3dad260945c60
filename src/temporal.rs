//! STUB (lead's, replaced by the wanvae helper's module at merge).
use anyhow::Result;

use crate::model::ModelCard;
use crate::runtime::Gpu;

pub struct ClipEncoder;

impl ClipEncoder {
    pub fn open(_card: &ModelCard, _intra_threads: usize, _gpu: Option<Gpu>) -> Result<Self> {
        Ok(ClipEncoder)
    }
    pub fn encode(
        &mut self,
        _frames: &[f32],
        _b: usize,
        _t: usize,
        _h: usize,
        _w: usize,
    ) -> Result<Vec<f32>> {
        unimplemented!()
    }
}

pub struct ClipDecoder;

impl ClipDecoder {
    pub fn open(_card: &ModelCard, _intra_threads: usize, _gpu: Option<Gpu>) -> Result<Self> {
        Ok(ClipDecoder)
    }
    pub fn decode(
        &mut self,
        _z: &[f32],
        _b: usize,
        _t_latent: usize,
        _h: usize,
        _w: usize,
    ) -> Result<Vec<f32>> {
        unimplemented!()
    }
}
