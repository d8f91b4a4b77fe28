//! The dynamic shared memory each tensor-core attention kernel is launched
//! with, by kernel name: `vppo-engine info` prints it beside ptxas' static
//! count. Here, not in one launcher file, because it names every one.

use super::flash_attn_tc::{tc_bwd_smem_bytes, TcFwdTile};
use super::flash_attn_wgmma::wgmma_fwd_smem_bytes;
use super::flash_attn_wgmma_bwd::wgmma_bwd_smem_bytes;
use super::paged_attn_tc::split_smem_bytes;

/// Dynamic shared memory a tensor-core attention kernel is launched with,
/// from its name (`vppo-engine info` prints it beside ptxas' static count);
/// `None` for any other kernel.
pub fn tc_dynamic_smem(function: &str) -> Option<usize> {
    let dim = |rest: &str| rest.parse::<usize>().ok();
    if let Some(rest) = function.strip_prefix("flash_attn_tc_fwd_d") {
        let (d, rows) = rest.split_once("_m")?;
        let tile = TcFwdTile {
            warps: dim(rows)? / 16,
            key_tile: 64,
        };
        return Some(tile.smem_bytes(dim(d)?));
    }
    if let Some(d) = function.strip_prefix("flash_attn_tc_bwd_d") {
        return Some(tc_bwd_smem_bytes(dim(d)?));
    }
    if let Some(d) = function.strip_prefix("flash_attn_wgmma_fwd_d") {
        return Some(wgmma_fwd_smem_bytes(dim(d)?));
    }
    if let Some(d) = function.strip_prefix("flash_attn_wgmma_bwd_d") {
        return Some(wgmma_bwd_smem_bytes(dim(d)?));
    }
    if let Some(d) = function.strip_prefix("paged_attn_tc_split_d") {
        return Some(split_smem_bytes(dim(d)?));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_reads_the_launch_shared_memory_from_kernel_names() {
        assert_eq!(
            tc_dynamic_smem("flash_attn_tc_fwd_d128_m128"),
            Some(104_448)
        );
        assert_eq!(
            tc_dynamic_smem("flash_attn_tc_fwd_d80_m64"),
            Some((64 + 256) * 88 * 2)
        );
        assert_eq!(
            tc_dynamic_smem("flash_attn_tc_bwd_d128"),
            Some(tc_bwd_smem_bytes(128))
        );
        assert_eq!(
            tc_dynamic_smem("paged_attn_tc_split_d128"),
            Some((16 + 256) * 136 * 2)
        );
        assert_eq!(
            tc_dynamic_smem("flash_attn_wgmma_fwd_d128"),
            Some(5 * 32_768 + 64 + 1024)
        );
        assert_eq!(tc_dynamic_smem("flash_attn_tc_dq_convert"), None);
        assert_eq!(tc_dynamic_smem("rmsnorm_fwd_f32"), None);
    }
}
