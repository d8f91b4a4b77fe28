//! The SASS reader behind `vppo-engine info`'s tensor-core column (issue
//! 14): counts HMMA/HGMMA per kernel and architecture.

#[path = "../build/sass.rs"]
#[allow(dead_code)]
mod sass;

use sass::{mma_counts, MmaCount};

const SAMPLE: &str = "
Fatbin elf code:
================
arch = sm_80
code version = [1,7]
host = linux
compile_size = 64bit

\tcode for sm_80
\t\tFunction : tc_kernel
\t.headerflags\t@\"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)\"
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/              @P0  HMMA.16816.F32.BF16 R16, R8, R14, R16 ;
        /*0030*/                   LDSM.16.M88.4 R8, [R2] ;
\t\t..........

\t\tFunction : plain_kernel
        /*0000*/                   FFMA R1, R2, R3, R4 ;
        /*0010*/                   EXIT ;

\tcode for sm_90a
\t\tFunction : wg_kernel
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
";

#[test]
fn counts_hmma_and_hgmma_per_kernel_and_arch() {
    let c = mma_counts(SAMPLE);
    let row = |arch: &str, function: &str, hmma, hgmma| MmaCount {
        arch: arch.into(),
        function: function.into(),
        hmma,
        hgmma,
    };
    assert_eq!(
        c,
        vec![
            row("sm_80", "tc_kernel", 2, 0),
            row("sm_80", "plain_kernel", 0, 0),
            row("sm_90a", "wg_kernel", 0, 2),
        ]
    );
}

#[test]
fn text_without_kernels_gives_nothing() {
    assert!(
        mma_counts("cuobjdump info    : File 'x.fatbin' does not contain device code").is_empty()
    );
}
