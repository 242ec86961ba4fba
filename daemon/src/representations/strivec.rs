//! Strivec radiance field (twin of `trellis/representations/radiance_field/strivec.py` `Strivec`,
//! a `DfsOctree` with the `trivec` primitive): per leaf voxel a rank-R set of three axis vectors of
//! length D, R densities and R colours. As the decoder fills it, every leaf sits at depth
//! `log2(resolution)` and `position` is the voxel centre in `[0, 1]^3`.

use anyhow::{bail, Result};

/// A radiance field as `SLatRadianceFieldDecoder.to_representation` builds it, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Strivec {
    /// Voxels per axis (a power of two).
    pub resolution: usize,
    /// `[x0, y0, z0, sx, sy, sz]`.
    pub aabb: [f32; 6],
    pub sh_degree: usize,
    /// R: terms per voxel.
    pub rank: usize,
    /// D: length of each axis vector.
    pub dim: usize,
    /// `[N, 3]` voxel centres `(coords + 0.5) / resolution`.
    pub position: Vec<f32>,
    /// `[N, 1]` octree depth of each leaf (`log2(resolution)`), uint8 as in the original.
    pub depth: Vec<u8>,
    /// `[N, R, 3, D]` axis vectors (the raw output plus 1).
    pub trivec: Vec<f32>,
    /// `[N, R]` densities (the trivec primitive's density activation is the identity).
    pub density: Vec<f32>,
    /// `[N, R, 1, 3]` colours.
    pub features_dc: Vec<f32>,
    /// Added to the density before rendering; the decoder sets 0.
    pub density_shift: f32,
}

/// `log2(resolution)` of a power of two, else an error (the original asserts it).
pub fn octree_depth(resolution: usize) -> Result<u8> {
    if resolution == 0 || !resolution.is_power_of_two() {
        bail!("Strivec: resolution {resolution} is not a power of two");
    }
    Ok(resolution.trailing_zeros() as u8)
}

impl Strivec {
    /// Channels of one voxel of the decoder output: `R*3*D | R | R*3`.
    pub fn channels(rank: usize, dim: usize) -> usize {
        rank * 3 * dim + rank + rank * 3
    }

    /// Builds the field from voxel coordinates `(x, y, z)` and the decoder's `[N, channels]`
    /// output rows (`to_representation`: trivec = raw + 1, density, features_dc).
    pub fn from_decoder_output(
        resolution: usize,
        rank: usize,
        dim: usize,
        coords: &[[i32; 3]],
        feats: &[f32],
    ) -> Result<Self> {
        let depth = octree_depth(resolution)?;
        let c = Self::channels(rank, dim);
        if feats.len() != coords.len() * c {
            bail!(
                "Strivec: decoder output has {} values, expected {} voxels x {c} channels",
                feats.len(),
                coords.len()
            );
        }
        let n = coords.len();
        let r = resolution as f32;
        let position = coords
            .iter()
            .flat_map(|p| p.map(|v| (v as f32 + 0.5) / r))
            .collect();
        let tv = rank * 3 * dim;
        let mut trivec = Vec::with_capacity(n * tv);
        let mut density = Vec::with_capacity(n * rank);
        let mut features_dc = Vec::with_capacity(n * rank * 3);
        for row in feats.chunks(c) {
            trivec.extend(row[..tv].iter().map(|x| x + 1.0));
            density.extend_from_slice(&row[tv..tv + rank]);
            features_dc.extend_from_slice(&row[tv + rank..]);
        }
        Ok(Self {
            resolution,
            aabb: [-0.5, -0.5, -0.5, 1.0, 1.0, 1.0],
            sh_degree: 0,
            rank,
            dim,
            position,
            depth: vec![depth; n],
            trivec,
            density,
            features_dc,
            density_shift: 0.0,
        })
    }

    /// Number of leaf voxels.
    pub fn len(&self) -> usize {
        self.depth.len()
    }

    pub fn is_empty(&self) -> bool {
        self.depth.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_each_row_and_offsets_trivec() {
        let (rank, dim) = (2, 3);
        let c = Strivec::channels(rank, dim);
        assert_eq!(c, 2 * 3 * 3 + 2 + 6);
        let feats: Vec<f32> = (0..2 * c).map(|i| i as f32).collect();
        let s =
            Strivec::from_decoder_output(16, rank, dim, &[[0, 1, 2], [15, 0, 3]], &feats).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.depth, vec![4, 4]);
        assert_eq!(&s.position[..3], &[0.5 / 16.0, 1.5 / 16.0, 2.5 / 16.0]);
        assert_eq!(s.trivec[0], 1.0);
        assert_eq!(s.trivec[18], c as f32 + 1.0);
        assert_eq!(&s.density[..2], &[18.0, 19.0]);
        assert_eq!(&s.features_dc[6..], &feats[c + 20..]);
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert!(octree_depth(12).is_err());
        assert!(Strivec::from_decoder_output(16, 2, 3, &[[0, 0, 0]], &[0.0; 5]).is_err());
    }
}
