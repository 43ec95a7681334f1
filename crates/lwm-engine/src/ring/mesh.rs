//! `mesh_dim = "dp,fsdp,tp,sp"`: the original's device mesh (tux `get_jax_mesh`), data,
//! fully-sharded data, tensor and sequence parallel degrees. One axis may be `-1`, inferred
//! from the number of workers; a leading `!` (the original's "keep device order") is
//! accepted and changes nothing here, where workers are always numbered in ring order.
//!
//! At inference one sequence is served, so only `sp` (the ring) may exceed 1 for now:
//! `dp`/`fsdp` need a batch of sequences and `tp` (splitting heads) is not built yet.

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshDim {
    pub dp: usize,
    pub fsdp: usize,
    pub tp: usize,
    pub sp: usize,
}

impl Default for MeshDim {
    fn default() -> Self {
        Self {
            dp: 1,
            fsdp: 1,
            tp: 1,
            sp: 1,
        }
    }
}

const AXES: [&str; 4] = ["dp", "fsdp", "tp", "sp"];

impl MeshDim {
    /// Parse `"dp,fsdp,tp,sp"`. `world` is the number of workers when the launcher fixes
    /// it (the MPI world size); it resolves a `-1` axis and must equal the product.
    pub fn parse(text: &str, world: Option<usize>) -> Result<Self> {
        let body = text.trim().trim_start_matches('!');
        let parts: Vec<&str> = body.split(',').map(str::trim).collect();
        if parts.len() != 4 {
            bail!("--mesh-dim '{text}' must have four comma-separated sizes dp,fsdp,tp,sp (e.g. 1,1,1,4)");
        }
        let mut dims = [0i64; 4];
        for (i, p) in parts.iter().enumerate() {
            dims[i] = p.parse::<i64>().map_err(|_| {
                anyhow::anyhow!("--mesh-dim '{text}': {} = '{p}' is not an integer", AXES[i])
            })?;
            if dims[i] == 0 || dims[i] < -1 {
                bail!(
                    "--mesh-dim '{text}': {} = {} (each size is >= 1, or -1 for one inferred axis)",
                    AXES[i],
                    dims[i]
                );
            }
        }
        let inferred: Vec<usize> = (0..4).filter(|&i| dims[i] == -1).collect();
        if inferred.len() > 1 {
            bail!("--mesh-dim '{text}': only one axis may be -1");
        }
        let known: i64 = dims.iter().filter(|&&d| d > 0).product();
        if let Some(&axis) = inferred.first() {
            let Some(world) = world.filter(|&w| w > 0) else {
                bail!(
                    "--mesh-dim '{text}': {} = -1 is inferred from the number of MPI processes; in one process give the size",
                    AXES[axis]
                );
            };
            if world as i64 % known != 0 {
                bail!("--mesh-dim '{text}': {world} workers are not divisible by the other axes' product {known}");
            }
            dims[axis] = world as i64 / known;
        }
        let mesh = Self {
            dp: dims[0] as usize,
            fsdp: dims[1] as usize,
            tp: dims[2] as usize,
            sp: dims[3] as usize,
        };
        if let Some(world) = world {
            if mesh.workers() != world {
                bail!(
                    "--mesh-dim '{text}' needs {} workers but {world} processes were started",
                    mesh.workers()
                );
            }
        }
        mesh.validate_for_inference()?;
        Ok(mesh)
    }

    pub fn workers(&self) -> usize {
        self.dp * self.fsdp * self.tp * self.sp
    }

    /// The axes inference can use today: the sequence ring only.
    pub fn validate_for_inference(&self) -> Result<()> {
        if self.dp != 1 || self.fsdp != 1 {
            bail!(
                "mesh_dim dp={} fsdp={}: data-parallel axes need a batch of sequences; inference serves one sequence, so both must be 1",
                self.dp,
                self.fsdp
            );
        }
        if self.tp != 1 {
            bail!(
                "mesh_dim tp={}: tensor parallelism (splitting heads) is not implemented; use tp=1 and put the workers on sp",
                self.tp
            );
        }
        if self.sp > 1024 {
            bail!(
                "mesh_dim sp={} is more workers than supported (1024)",
                self.sp
            );
        }
        Ok(())
    }
}

impl std::fmt::Display for MeshDim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{},{},{}", self.dp, self.fsdp, self.tp, self.sp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_original_syntax() {
        assert_eq!(MeshDim::parse("1,1,1,4", None).unwrap().sp, 4);
        assert_eq!(MeshDim::parse("!1,1,1,2", None).unwrap().sp, 2);
        // -1 is inferred from the MPI world size.
        assert_eq!(MeshDim::parse("1,1,1,-1", Some(3)).unwrap().sp, 3);
    }

    #[test]
    fn rejects_what_inference_cannot_do_with_a_reason() {
        for (text, world, needle) in [
            ("1,1,4", None, "four"),
            ("1,1,1,x", None, "'x'"),
            ("1,1,1,0", None, "sp = 0"),
            ("1,-1,1,-1", Some(4), "only one"),
            ("1,1,1,-1", None, "MPI"),
            ("2,1,1,2", None, "dp=2"),
            ("1,1,2,2", None, "tp=2"),
            ("1,1,1,4", Some(2), "needs 4 workers"),
            ("1,1,1,-1", Some(0), "number of MPI processes"),
        ] {
            let e = MeshDim::parse(text, world).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
