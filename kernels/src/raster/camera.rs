//! Pinhole cameras with the original's conventions (`trellis/utils/render_utils.py`, utils3d):
//! extrinsics in OpenCV axes (x right, y down, z forward) from a look-at, intrinsics normalised
//! to the image size (`fx = 0.5 / tan(fov / 2)`, principal point `(0.5, 0.5)`).
//!
//! Pixel coordinates are continuous with pixel `i`'s centre at `i + 0.5`, so a camera-space
//! point `(x, y, z)` lands at `((fx x / z + cx) W, (fy y / z + cy) H)`.

/// A world → camera transform and normalised intrinsics for a `width × height` image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Camera {
    /// Rows of the world → camera rotation.
    pub rot: [[f32; 3]; 3],
    /// World → camera translation.
    pub trans: [f32; 3],
    /// Focal lengths in units of the image width / height.
    pub fx: f32,
    pub fy: f32,
    /// Principal point in units of the image width / height.
    pub cx: f32,
    pub cy: f32,
    pub width: usize,
    pub height: usize,
    /// Clipping planes (camera-space z): nothing nearer than `near` or farther than `far` is drawn.
    pub near: f32,
    pub far: f32,
}

fn sub(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn cross(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn normalize(a: [f32; 3]) -> [f32; 3] {
    let n = (a[0] * a[0] + a[1] * a[1] + a[2] * a[2]).sqrt().max(1e-12);
    [a[0] / n, a[1] / n, a[2] / n]
}

impl Camera {
    /// `extrinsics_look_at(eye, target, up)` + `intrinsics_from_fov_xy(fov, fov)` of utils3d.
    pub fn look_at(
        eye: [f32; 3],
        target: [f32; 3],
        up: [f32; 3],
        fov_rad: f32,
        width: usize,
        height: usize,
    ) -> Self {
        let z = normalize(sub(target, eye));
        let x = normalize(cross([-up[0], -up[1], -up[2]], z));
        let y = normalize(cross(z, x));
        let rot = [x, y, z];
        let trans = [
            -(x[0] * eye[0] + x[1] * eye[1] + x[2] * eye[2]),
            -(y[0] * eye[0] + y[1] * eye[1] + y[2] * eye[2]),
            -(z[0] * eye[0] + z[1] * eye[1] + z[2] * eye[2]),
        ];
        let f = 0.5 / (fov_rad * 0.5).tan();
        Self {
            rot,
            trans,
            fx: f,
            fy: f,
            cx: 0.5,
            cy: 0.5,
            width,
            height,
            near: 0.1,
            far: 100.0,
        }
    }

    /// `yaw_pitch_r_fov_to_extrinsics_intrinsics` of `render_utils.py`: a camera at
    /// `r (sin yaw cos pitch, cos yaw cos pitch, sin pitch)` looking at the origin, z up.
    pub fn orbit(yaw: f32, pitch: f32, radius: f32, fov_deg: f32, resolution: usize) -> Self {
        let eye = [
            yaw.sin() * pitch.cos() * radius,
            yaw.cos() * pitch.cos() * radius,
            pitch.sin() * radius,
        ];
        Self::look_at(
            eye,
            [0.0; 3],
            [0.0, 0.0, 1.0],
            fov_deg.to_radians(),
            resolution,
            resolution,
        )
    }

    /// The same camera with other clipping planes.
    pub fn with_clip(mut self, near: f32, far: f32) -> Self {
        self.near = near;
        self.far = far;
        self
    }

    /// World → camera space.
    pub fn to_camera(&self, p: [f32; 3]) -> [f32; 3] {
        let r = &self.rot;
        [
            r[0][0] * p[0] + r[0][1] * p[1] + r[0][2] * p[2] + self.trans[0],
            r[1][0] * p[0] + r[1][1] * p[1] + r[1][2] * p[2] + self.trans[1],
            r[2][0] * p[0] + r[2][1] * p[1] + r[2][2] * p[2] + self.trans[2],
        ]
    }

    /// Camera-space point → continuous pixel coordinates and depth (`None` behind the camera).
    pub fn project_camera(&self, c: [f32; 3]) -> Option<[f32; 3]> {
        if c[2] <= 1e-8 {
            return None;
        }
        Some([
            (self.fx * c[0] / c[2] + self.cx) * self.width as f32,
            (self.fy * c[1] / c[2] + self.cy) * self.height as f32,
            c[2],
        ])
    }

    /// World point → continuous pixel coordinates and depth (`None` behind the camera).
    pub fn project(&self, p: [f32; 3]) -> Option<[f32; 3]> {
        self.project_camera(self.to_camera(p))
    }

    /// The camera centre in world space (`-Rᵀ t`).
    pub fn center(&self) -> [f32; 3] {
        let r = &self.rot;
        let t = self.trans;
        [
            -(r[0][0] * t[0] + r[1][0] * t[1] + r[2][0] * t[2]),
            -(r[0][1] * t[0] + r[1][1] * t[1] + r[2][1] * t[2]),
            -(r[0][2] * t[0] + r[1][2] * t[1] + r[2][2] * t[2]),
        ]
    }

    /// Focal lengths in pixels.
    pub fn focal_px(&self) -> (f32, f32) {
        (self.fx * self.width as f32, self.fy * self.height as f32)
    }
}

/// `radical_inverse` of `random_utils.py`.
fn radical_inverse(base: u64, mut n: u64) -> f64 {
    let inv = 1.0 / base as f64;
    let mut f = inv;
    let mut v = 0.0;
    while n > 0 {
        v += (n % base) as f64 * f;
        n /= base;
        f *= inv;
    }
    v
}

/// `sphere_hammersley_sequence(n, num_samples)` of `random_utils.py`: `(yaw, pitch)` in radians
/// of the `n`-th of `total` well-spread directions.
pub fn sphere_hammersley(n: usize, total: usize) -> (f32, f32) {
    let u = n as f64 / total.max(1) as f64;
    let v = radical_inverse(2, n as u64);
    let theta = (1.0 - 2.0 * u).acos() - std::f64::consts::FRAC_PI_2;
    let phi = v * 2.0 * std::f64::consts::PI;
    (phi as f32, theta as f32)
}

/// `total` cameras spread over the sphere (the original's `render_multiview` set-up: radius 2,
/// fov 40°).
pub fn hammersley_cameras(
    total: usize,
    radius: f32,
    fov_deg: f32,
    resolution: usize,
) -> Vec<Camera> {
    (0..total)
        .map(|i| {
            let (yaw, pitch) = sphere_hammersley(i, total);
            Camera::orbit(yaw, pitch, radius, fov_deg, resolution)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_at_is_opencv_and_projects_the_target_to_the_centre() {
        // From -y looking at the origin with z up: x right, y down (world -z), z forward (+y).
        let c = Camera::look_at([0.0, -2.0, 0.0], [0.0; 3], [0.0, 0.0, 1.0], 1.0, 64, 32);
        assert_eq!(c.rot[0], [1.0, 0.0, 0.0]);
        assert!((c.rot[1][2] + 1.0).abs() < 1e-6);
        assert!((c.rot[2][1] - 1.0).abs() < 1e-6);
        let p = c.project([0.0; 3]).unwrap();
        assert!((p[0] - 32.0).abs() < 1e-4 && (p[1] - 16.0).abs() < 1e-4);
        assert!((p[2] - 2.0).abs() < 1e-6);
        // World +z (up) is up in the image: a smaller row.
        assert!(c.project([0.0, 0.0, 0.5]).unwrap()[1] < 16.0);
        // World +x is right.
        assert!(c.project([0.5, 0.0, 0.0]).unwrap()[0] > 32.0);
        let e = c.center();
        assert!((e[1] + 2.0).abs() < 1e-6 && e[0].abs() < 1e-6);
    }

    #[test]
    fn orbit_matches_the_original_formula() {
        // yaw 0, pitch 0 → eye (0, r, 0).
        let c = Camera::orbit(0.0, 0.0, 2.0, 40.0, 512);
        let e = c.center();
        assert!(e[0].abs() < 1e-6 && (e[1] - 2.0).abs() < 1e-6 && e[2].abs() < 1e-6);
        let f = 0.5 / (20f32.to_radians()).tan();
        assert!((c.fx - f).abs() < 1e-6);
        let c = Camera::orbit(0.3, 0.4, 2.0, 40.0, 512);
        let e = c.center();
        assert!((e[2] - 2.0 * 0.4f32.sin()).abs() < 1e-5);
        assert!((e[0] - 2.0 * 0.3f32.sin() * 0.4f32.cos()).abs() < 1e-5);
    }

    #[test]
    fn hammersley_matches_random_utils() {
        // sphere_hammersley_sequence(3, 8) = [radical_inverse(2, 3) * 2π, acos(1 - 2·3/8) - π/2]
        let (y, p) = sphere_hammersley(3, 8);
        assert!((y as f64 - 0.75 * 2.0 * std::f64::consts::PI).abs() < 1e-6);
        assert!((p as f64 - ((0.25f64).acos() - std::f64::consts::FRAC_PI_2)).abs() < 1e-6);
        assert_eq!(sphere_hammersley(0, 4), (0.0, -std::f32::consts::FRAC_PI_2));
    }
}
