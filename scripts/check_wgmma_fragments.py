#!/usr/bin/env python3
"""Host-side check of everything layout-related in the sm_90a flash-attention
forward (kernels/flash_attn_wgmma.cu), no GPU needed. Exits 1 on a mismatch.

Two halves, kept apart on purpose:

HARDWARE MODELS (from the PTX ISA and CUTLASS's canonical GMMA layouts,
written without looking at the kernel's formulas):
  - TMA's tiled copy with a swizzle: box element (row r, column c) lands at
    dst + r * box_row_bytes + 2 c, then Swizzle<B,4,3> of the shared-memory
    address (bits 4..4+B XOR bits 7..7+B; B = 3, 2, 1 for 128-, 64-, 32-byte
    swizzle); coordinates outside the tensor map read as zero.
  - the wgmma matrix descriptor: bit fields (start >> 4 in 0-13, LBO >> 4 in
    16-29, SBO >> 4 in 32-45, layout type in 62-63), and the address of
    operand element (mn, k) of one k16 step in the canonical layouts
    (cute mma_sm90_desc / make_gmma_desc, T = 8 bf16 per 16 bytes, W = span / 16):
      K-major  Sw<B,4,3> o ((8,m),(T,2)):((W T, SBO),(1, T))
      MN-major Sw<B,4,3> o ((T,W,m),(8,k)):((1, T, LBO),(W T, SBO))
    then the same address swizzle;
  - the accumulator fragment of m64nNk16 (f32): thread t (warp w = t / 32,
    lane = 4 group + quad), register i -> row 16 w + group + 8 ((i / 2) % 2),
    column 8 (i / 4) + 2 quad + i % 2; the 16-bit register A fragment:
    register r, half e -> row 16 w + group + 8 (r % 2), k 2 quad + e + 8 (r / 2)
    (PTX ISA "Matrix fragments for wgmma .m64nNk16", CUTLASS CLayout_64xN /
    ALayout_64x16);
  - the mbarrier phase rules (try_wait.parity P succeeds once the phase of
    parity P completed; a fresh barrier is in phase 0).

KERNEL TRANSCRIPTION (the formulas of flash_attn_wgmma.cu; keep in step):
  FaWgLayout (panels, offsets), wg_desc, the per-k-step descriptor start
  addresses of Q, K and V, the TMA destinations and coordinates, the packing
  of S accumulators into P's A fragments, fa_wg_swz (the O staging) and the
  producer/consumer barrier protocol.

Checks: for head dims 64, 80 and 128 and both consumer warpgroups, Q, K, V
tiles go through the TMA model (with rows and, for the pad-free d=80 layout,
columns at the tensor edge), S = Q K^T and O = P V run through the
descriptor and fragment models and are compared with numpy; the O staging
round-trips and is bank-conflict free; the shared-memory map is disjoint,
aligned and fits; the descriptors' fields fit; a randomised simulation of the
TMA ring (producer + 2 consumers, mbarrier parity rules) never lets a tile be
overwritten while in use and never deadlocks; the kernel's block/warpgroup/
tile control flow (which blocks run, tiles loaded and computed, masks, the
-inf rules of the online softmax, rows stored, lse) at matrix level against
a float64 attention on varlen, causal/bidirectional, GQA shapes with rows and
whole blocks that see no key. Negative controls (a planted mistake each:
wrong swizzle, LBO, operand major-ness, P packing, consumer rows, unaligned
window, barrier parity/count, a skipped mask) must each be caught.
"""
import sys

import numpy as np

rng = np.random.default_rng(7)
ok = True


def check(name, cond, detail=""):
    global ok
    print(f"{'ok  ' if cond else 'FAIL'} {name}{(': ' + detail) if detail else ''}")
    ok &= bool(cond)


# ============================ hardware models ============================

SWIZZLE_BITS = {128: 3, 64: 2, 32: 1}  # Swizzle<B,4,3>
DESC_LAYOUT = {128: 1, 64: 2, 32: 3}  # descriptor bits 62-63


def swizzle(addr, span):
    b = SWIZZLE_BITS[span]
    mask = (1 << b) - 1
    return addr ^ (((addr >> 7) & mask) << 4)


class Smem:
    """Shared memory as bytes holding bf16 values (here: float64 per 2 bytes)."""

    def __init__(self, size):
        self.val = {}
        self.size = size

    def write(self, addr, v):
        assert addr % 2 == 0 and 0 <= addr < self.size, addr
        self.val[addr] = v

    def read(self, addr):
        assert addr % 2 == 0 and 0 <= addr < self.size, addr
        return self.val[addr]


def tma_load_3d(smem, dst, tensor, box, coords, span):
    """cp.async.bulk.tensor.3d tile mode: tensor[T][H][D] (dims D, H, T),
    box (b0, b1, b2), start coords (c0, c1, c2); out-of-bounds reads are 0."""
    T, H, D = tensor.shape
    b0, b1, b2 = box
    assert b0 * 2 <= span, "box row wider than the swizzle span"
    assert dst % 128 == 0
    c0, c1, c2 = coords
    for z in range(b2):
        for y in range(b1):
            for x in range(b0):
                t, h, d = c2 + z, c1 + y, c0 + x
                v = tensor[t, h, d] if (0 <= t < T and 0 <= h < H and 0 <= d < D) else 0.0
                lin = dst + ((z * b1 + y) * b0 + x) * 2
                smem.write(swizzle(lin, span), v)
    return b0 * b1 * b2 * 2  # bytes counted by complete_tx


def desc_decode(desc):
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    base_off = (desc >> 49) & 7
    layout = (desc >> 62) & 3
    span = {1: 128, 2: 64, 3: 32}[layout]  # 0 (no swizzle) is not used here
    assert base_off == 0
    return start, lbo, sbo, span


def operand_addr(desc, mn, k, major):
    """Shared-memory byte address of element (mn, k) of one k16 operand."""
    start, lbo, sbo, span = desc_decode(desc)
    T, W = 8, span // 16
    if major == "K":
        # ((8,m),(T,2)):((W T, SBO),(1, T)) in elements; SBO in bytes.
        lin = start + (mn % 8) * W * T * 2 + (mn // 8) * sbo + k * 2
    else:
        # ((T,W,m),(8,k)):((1, T, LBO),(W T, SBO))
        lin = start + (mn % (T * W)) * 2 + (mn // (T * W)) * lbo + (k % 8) * W * T * 2 + (k // 8) * sbo
    return swizzle(lin, span)


def acc_coord(t, i):
    w, lane = t // 32, t % 32
    g, q = lane // 4, lane % 4
    return 16 * w + g + 8 * ((i // 2) % 2), 8 * (i // 4) + 2 * q + i % 2


def afrag_coord(t, r, e):
    w, lane = t // 32, t % 32
    g, q = lane // 4, lane % 4
    return 16 * w + g + 8 * (r % 2), 2 * q + e + 8 * (r // 2)


def wgmma_ss(acc, smem, desc_a, desc_b, n, trans_b, scale_d):
    """acc[t][i] (128 threads x n/2) = (scale_d ? acc : 0) + A B, A and B
    gathered through the descriptors (A K-major, B K-major or MN-major)."""
    A = np.array([[smem.read(operand_addr(desc_a, m, k, "K")) for k in range(16)] for m in range(64)])
    return wgmma_rs_matrix(acc, A, smem, desc_b, n, trans_b, scale_d)


def wgmma_rs(acc, afrag, smem, desc_b, n, trans_b, scale_d):
    """A from registers: afrag[t][r] = (lo, hi) bf16 pair of register r."""
    A = np.full((64, 16), np.nan)
    for t in range(128):
        for r in range(4):
            for e in range(2):
                m, k = afrag_coord(t, r, e)
                assert np.isnan(A[m, k])
                A[m, k] = afrag[t][r][e]
    assert not np.isnan(A).any()
    return wgmma_rs_matrix(acc, A, smem, desc_b, n, trans_b, scale_d)


def wgmma_rs_matrix(acc, A, smem, desc_b, n, trans_b, scale_d):
    major = "MN" if trans_b else "K"
    B = np.array([[smem.read(operand_addr(desc_b, j, k, major)) for j in range(n)] for k in range(16)])
    D = A @ B
    out = [[0.0] * (n // 2) for _ in range(128)]
    for t in range(128):
        for i in range(n // 2):
            m, j = acc_coord(t, i)
            out[t][i] = (acc[t][i] if scale_d else 0.0) + D[m, j]
    return out


def acc_matrix(acc, n):
    M = np.full((64, n), np.nan)
    for t in range(128):
        for i in range(n // 2):
            m, j = acc_coord(t, i)
            assert np.isnan(M[m, j]), "two registers map to one element"
            M[m, j] = acc[t][i]
    return M


def bf16(x):
    """Round to nearest even bf16 (what pack_bf16 does)."""
    a = np.asarray(x, dtype=np.float32).copy()
    u = a.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


# ========================= kernel transcription ==========================
# flash_attn_wgmma.cu: constants and FaWgLayout<D>.
BM, BN, STAGES = 128, 128, 2


class Layout:
    def __init__(self, D):
        self.D = D
        self.PW = 64 if D % 64 == 0 else 16
        self.RB = 2 * self.PW
        self.PANELS = D // self.PW
        self.SBO = 8 * self.RB
        self.SWIZZLE = 1 if self.RB == 128 else 3
        self.Q_BYTES = self.PANELS * BM * self.RB
        self.KV_BYTES = self.PANELS * BN * self.RB
        self.Q_OFF = 0
        self.K_OFF = self.Q_BYTES
        self.V_OFF = self.K_OFF + STAGES * self.KV_BYTES
        self.BAR_OFF = self.V_OFF + STAGES * self.KV_BYTES
        self.SMEM_BYTES = self.BAR_OFF + 64 + 1024


def wg_desc(addr, lbo, sbo, swz):  # wg_desc()
    return ((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (swz << 62)


def fa_wg_swz(L, row, col, rows_per_panel):  # fa_wg_swz<PW>()
    off = row * L.RB + (col % L.PW) * 2
    mask = L.RB // 16 - 1
    return (col // L.PW) * rows_per_panel * L.RB + (off ^ (((off >> 7) & mask) << 4))


def kernel_tile(L, smem, base, c, s, Qg, Kg, Vg, h, g, q_row0, k_row0, mutation=None):
    """One consumer warpgroup's S and O for one stage, as the kernel builds
    the loads and descriptors. Returns (S matrix 64 x BN, O matrix 64 x D, P,
    the O accumulators). `mutation` plants one known mistake (the negative
    controls: each must make a comparison fail)."""
    q_s, k_s, v_s = base + L.Q_OFF, base + L.K_OFF, base + L.V_OFF
    # Producer: Q once, K and V of the tile into stage s.
    tx = 0
    for p in range(L.PANELS):
        tx += tma_load_3d(smem, q_s + p * BM * L.RB, Qg, (L.PW, 1, BM), (L.PW * p, h, q_row0), L.RB)
    assert tx == L.Q_BYTES, "Q's expect_tx differs from the bytes TMA delivers"
    tx_k = tx_v = 0
    for p in range(L.PANELS):
        tx_k += tma_load_3d(smem, k_s + s * L.KV_BYTES + p * BN * L.RB, Kg, (L.PW, 1, BN), (L.PW * p, g, k_row0), L.RB)
    for p in range(L.PANELS):
        tx_v += tma_load_3d(smem, v_s + s * L.KV_BYTES + p * BN * L.RB, Vg, (L.PW, 1, BN), (L.PW * p, g, k_row0), L.RB)
    assert tx_k == L.KV_BYTES and tx_v == L.KV_BYTES
    # S = Q K^T: KD k-steps, SS wgmma m64n128k16, both K-major.
    kb = k_s + s * L.KV_BYTES
    sc = [[0.0] * (BN // 2) for _ in range(128)]
    for kk in range(L.D // 16):
        p, kin = 16 * kk // L.PW, (16 * kk % L.PW) * 2
        da = wg_desc(q_s + p * BM * L.RB + 64 * c * L.RB + kin, 16, L.SBO, L.SWIZZLE)
        db = wg_desc(kb + p * BN * L.RB + kin, 16, L.SBO, L.SWIZZLE)
        if mutation == "k_unswizzled_span":  # descriptor swizzle != TMA's
            db = (db & ~(3 << 62)) | ((2 if L.SWIZZLE != 2 else 1) << 62)
        if mutation == "q_other_consumer":
            da = wg_desc(q_s + p * BM * L.RB + 64 * (1 - c) * L.RB + kin, 16, L.SBO, L.SWIZZLE)
        sc = wgmma_ss(sc, smem, da, db, BN, trans_b=False, scale_d=kk > 0)
    S = acc_matrix(sc, BN)
    # Stand-in probabilities (any values exercise the map): bf16 of S / 8.
    pv = [[x / 8.0 for x in row] for row in sc]
    afrags = []
    for t in range(128):
        per_k = []
        for kk in range(BN // 16):
            r = [
                (pv[t][8 * kk + 0], pv[t][8 * kk + 1]),
                (pv[t][8 * kk + 2], pv[t][8 * kk + 3]),
                (pv[t][8 * kk + 4], pv[t][8 * kk + 5]),
                (pv[t][8 * kk + 6], pv[t][8 * kk + 7]),
            ]
            if mutation == "p_pairs_swapped":
                r = [r[0], r[2], r[1], r[3]]
            per_k.append([tuple(bf16(np.array(x))) for x in r])
        afrags.append(per_k)
    # O = P V: RS wgmma m64nDk16, B = V MN-major (imm-trans-b = 1).
    vb = v_s + s * L.KV_BYTES
    acc = [[0.0] * (L.D // 2) for _ in range(128)]
    for kk in range(BN // 16):
        lbo = BN * L.RB if mutation != "v_lbo_one_panel" else L.RB * 64
        db = wg_desc(vb + kk * 16 * L.RB, lbo, L.SBO, L.SWIZZLE)
        trans_b = mutation != "v_k_major"
        if not trans_b:  # V read K-major: the operand is [D x 16] rows of V^T
            db = wg_desc(vb + kk * 16 * L.RB, 16, L.SBO, L.SWIZZLE)
        acc = wgmma_rs(acc, [afrags[t][kk] for t in range(128)], smem, db, L.D, trans_b=trans_b, scale_d=True)
    P = bf16(acc_matrix(pv, BN))
    return S, acc_matrix(acc, L.D), P, acc


def tile_errors(D, mutation=None, c=0, s=0):
    """max |S - Q K^T|, max |O - P V| for one consumer and stage."""
    L = Layout(D)
    Tq, Tk, hq, hkv = 150, 200, 3, 2
    Qg = bf16(rng.standard_normal((Tq, hq, D)))
    Kg = bf16(rng.standard_normal((Tk, hkv, D)))
    Vg = bf16(rng.standard_normal((Tk, hkv, D)))
    h, g, q_row0, k_row0 = 2, 1, 100, 72
    raw = 48
    base = (raw + 1023) & ~1023
    if mutation == "base_not_rounded":
        base = raw
    smem = Smem(raw + L.SMEM_BYTES + 1024)
    try:
        S, O, P, _ = kernel_tile(L, smem, base, c, s, Qg, Kg, Vg, h, g, q_row0, k_row0, mutation)
    except (KeyError, AssertionError):
        return np.inf, np.inf  # read of a byte TMA never wrote
    qrows = np.array([Qg[q_row0 + 64 * c + m, h] if q_row0 + 64 * c + m < Tq else np.zeros(D) for m in range(64)])
    krows, vrows = Kg[k_row0:k_row0 + BN, g], Vg[k_row0:k_row0 + BN, g]
    Pref = bf16(qrows @ krows.T / 8.0)
    return np.abs(S - qrows @ krows.T).max(), np.abs(O - Pref @ vrows).max()


def check_negative_controls():
    """Each planted mistake must be caught: the models are not blind to the
    class of error they exist to find."""
    for D, mutation in [
        (128, "k_unswizzled_span"),
        (80, "k_unswizzled_span"),
        (128, "q_other_consumer"),
        (128, "p_pairs_swapped"),
        (128, "v_lbo_one_panel"),
        (80, "v_lbo_one_panel"),
        (128, "v_k_major"),
        (64, "base_not_rounded"),
        (80, "base_not_rounded"),
    ]:
        e_s, e_o = tile_errors(D, mutation)
        check(f"negative control d={D} {mutation}: caught", max(e_s, e_o) > 1e-3, f"errors {e_s:.1e} / {e_o:.1e}")


def check_tile(D):
    L = Layout(D)
    # Global tensors [T][H][D]; the Q rows run past T (zero-filled by TMA)
    # and the K/V tile starts inside another sequence's rows.
    Tq, Tk, hq, hkv = 150, 200, 3, 2
    Qg = bf16(rng.standard_normal((Tq, hq, D)))
    Kg = bf16(rng.standard_normal((Tk, hkv, D)))
    Vg = bf16(rng.standard_normal((Tk, hkv, D)))
    h, g, q_row0, k_row0 = 2, 1, 100, 72  # Q rows 100..227 (150.. are OOB)
    raw = 48  # a dynamic window that is not 1024-aligned
    base = (raw + 1023) & ~1023
    smem = Smem(raw + L.SMEM_BYTES)
    check(f"d={D}: shared memory fits sm_90 ({L.SMEM_BYTES} bytes <= 227 KiB)", L.SMEM_BYTES <= 227 * 1024)
    check(f"d={D}: layout ends before the window does",
          base + L.BAR_OFF + 64 <= raw + L.SMEM_BYTES)
    aligned = all(
        (base + off) % 1024 == 0
        for off in [L.Q_OFF + p * BM * L.RB for p in range(L.PANELS)]
        + [L.K_OFF + s * L.KV_BYTES + p * BN * L.RB for s in range(STAGES) for p in range(L.PANELS)]
        + [L.V_OFF + s * L.KV_BYTES + p * BN * L.RB for s in range(STAGES) for p in range(L.PANELS)]
    )
    check(f"d={D}: every TMA panel starts on a 1024-byte swizzle period", aligned)
    for s in range(STAGES):
        for c in range(2):
            S, O, P, acc = kernel_tile(L, smem, base, c, s, Qg, Kg, Vg, h, g, q_row0, k_row0)
            qrows = np.array([Qg[q_row0 + 64 * c + m, h] if q_row0 + 64 * c + m < Tq else np.zeros(D) for m in range(64)])
            krows = Kg[k_row0:k_row0 + BN, g]
            vrows = Vg[k_row0:k_row0 + BN, g]
            e_s = np.abs(S - qrows @ krows.T).max()
            # P from numpy's S (bf16 of S / 8, what kernel_tile feeds in).
            e_o = np.abs(O - bf16(qrows @ krows.T / 8.0) @ vrows).max()
            check(f"d={D} stage {s} consumer {c}: S = Q K^T through descriptors + accumulator map", e_s < 1e-9, f"max err {e_s:.1e}")
            check(f"d={D} stage {s} consumer {c}: O = P V (P as register A, V MN-major)", e_o < 1e-9, f"max err {e_o:.1e}")
    # Descriptor fields fit their 14 bits (start is masked to 18 bits -> 14).
    for lbo in (16, BN * L.RB):
        check(f"d={D}: LBO {lbo} fits 14 bits", (lbo >> 4) < (1 << 14) and lbo % 16 == 0)
    check(f"d={D}: SBO {L.SBO} fits 14 bits", (L.SBO >> 4) < (1 << 14))
    check(f"d={D}: the layout's addresses fit the descriptor's 18-bit start field",
          raw + L.SMEM_BYTES <= 1 << 18)
    check_staging(L, acc)


def check_staging(L, acc):
    """O staging: each thread writes pack_bf16 pairs at fa_wg_swz(row, col),
    each warp reads its 16 rows back as 16-byte chunks."""
    D = L.D
    c = 1
    mem = {}
    banks_ok = True
    for w in range(4):
        for n in range(D // 8):
            for half in range(2):
                words = {}
                for lane in range(32):
                    g, q = lane // 4, lane % 4
                    row = 64 * c + 16 * w + g + 8 * half
                    col = 8 * n + 2 * q
                    off = fa_wg_swz(L, row, col, BM)
                    assert off % 4 == 0
                    t = 32 * w + lane
                    i = 4 * n + 2 * half
                    mem[off] = acc[t][i]
                    mem[off + 2] = acc[t][i + 1]
                    words.setdefault((off // 4) % 32, set()).add(off // 4)
                banks_ok &= all(len(v) == 1 for v in words.values())
    check(f"d={D}: O staging writes (8 rows x 4 lanes) hit 32 distinct banks", banks_ok)
    # Read back: 16 rows x D/8 chunks per warp, 8 consecutive bf16 per chunk.
    M = acc_matrix(acc, D)
    got = np.full((64, D), np.nan)
    chunks = D // 8
    for w in range(4):
        for idx in range(16 * chunks):
            r, ch = idx // chunks, idx % chunks
            off = fa_wg_swz(L, 64 * c + 16 * w + r, ch * 8, BM)
            assert off % 16 == 0
            for e in range(8):
                got[16 * w + r, ch * 8 + e] = mem[off + 2 * e]
    check(f"d={D}: O staging round-trips every element", np.array_equal(got, M))
    # Staging stays inside consumer c's own rows of the Q tile.
    lo = min(mem)
    hi = max(mem)
    inside = all(
        any(p * BM * L.RB + 64 * c * L.RB <= o < p * BM * L.RB + 64 * (c + 1) * L.RB for p in range(L.PANELS))
        for o in mem
    )
    check(f"d={D}: O staging stays in the warpgroup's own Q rows [{lo}, {hi}]", inside)


def check_fragment_maps():
    for n in (64, 80, 128):
        seen = set()
        for t in range(128):
            for i in range(n // 2):
                seen.add(acc_coord(t, i))
        check(f"m64n{n}k16 accumulator map is a bijection", len(seen) == 64 * n and all(0 <= m < 64 and 0 <= j < n for m, j in seen))
    seen = {afrag_coord(t, r, e) for t in range(128) for r in range(4) for e in range(2)}
    check("m64k16 register A map is a bijection", len(seen) == 64 * 16)
    # The kernel's P packing: A register r of k-step kk holds accumulators
    # 8 kk + 2 r, + 1 of the same thread; the element coordinates must agree.
    agree = True
    for t in range(128):
        for kk in range(BN // 16):
            for r in range(4):
                for e in range(2):
                    m_acc, j_acc = acc_coord(t, 8 * kk + 2 * r + e)
                    m_a, k_a = afrag_coord(t, r, e)
                    agree &= (m_acc, j_acc) == (m_a, 16 * kk + k_a)
    check("S accumulators pack into P's A fragments element for element", agree)


class MBarrier:
    """An mbarrier: `count` arrivals and the expected transaction bytes
    complete the phase; try_wait.parity(p) passes once the phase parity
    differs from p. Shared with check_wgmma_bwd.py."""

    def __init__(self, count):
        self.count, self.pending, self.phase, self.tx = count, count, 0, 0

    def arrive(self, n=1, tx=0):
        self.pending -= n
        self.tx += tx
        self._maybe_flip()

    def complete_tx(self, b):
        self.tx -= b
        self._maybe_flip()

    def _maybe_flip(self):
        if self.pending <= 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def done(self, parity):  # try_wait.parity
        return (self.phase & 1) != parity


def check_pipeline(n_tiles, seed, producer_parity_flip=1, empty_count=256):
    """Producer + 2 consumers over the STAGES-deep ring with mbarrier parity
    rules, random interleaving. Each consumer is one unit that arrives with
    its 128 threads' count at once (the empty barrier expects 256)."""
    r = np.random.default_rng(seed)

    full = [MBarrier(1) for _ in range(STAGES)]
    empty = [MBarrier(empty_count) for _ in range(STAGES)]
    stage_tile = [None] * STAGES
    in_use = [set() for _ in range(STAGES)]
    inflight = []  # (stage, tile) copies not landed yet
    prod_t = 0
    cons_t = [0, 0]
    cons_state = ["wait", "wait"]
    steps = 0
    while (prod_t < n_tiles or inflight or min(cons_t) < n_tiles) and steps < 100000:
        steps += 1
        actors = []
        if prod_t < n_tiles:
            actors.append("p")
        if inflight:
            actors.append("tma")
        actors += [f"c{c}" for c in range(2) if cons_t[c] < n_tiles]
        a = actors[r.integers(len(actors))]
        if a == "p":
            s, ph = prod_t % STAGES, (prod_t // STAGES) & 1
            if empty[s].done(ph ^ producer_parity_flip):
                if in_use[s]:
                    return False, f"producer refills stage {s} while {in_use[s]} read it"
                full[s].arrive(1, tx=100)
                inflight.append((s, prod_t))
                prod_t += 1
        elif a == "tma":
            s, t = inflight.pop(0)
            stage_tile[s] = t
            full[s].complete_tx(100)
        else:
            c = int(a[1])
            t = cons_t[c]
            s, ph = t % STAGES, (t // STAGES) & 1
            if cons_state[c] == "wait":
                if full[s].done(ph):
                    if stage_tile[s] != t:
                        return False, f"consumer {c} saw tile {stage_tile[s]} for {t}"
                    in_use[s].add(c)
                    cons_state[c] = "use"
            else:
                in_use[s].discard(c)
                empty[s].arrive(128)
                cons_state[c] = "wait"
                cons_t[c] += 1
    if steps >= 100000:
        return False, "deadlock"
    return True, ""



# ====================== the kernel's control flow ========================
# fa_wg_fwd's block/warpgroup/tile logic at matrix level (the fragment maps
# are checked above): which blocks run, how many K/V tiles the producer
# loads, which tiles a warpgroup computes (`active`), where it masks
# (`wg_keys_all`), the base-2 online softmax with its -inf rules, the bf16 P,
# the rows stored and the lse. TMA semantics: rows past the tensor are 0,
# rows past a sequence are the next sequence's (they must be masked).
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453


def visible(i, lq, lk, causal):  # fa_wg_visible
    if not causal:
        return lk
    return max(0, min(i + 1 + lk - lq, lk))


def tma_rows(x, start, n, h):
    """n rows of head h from token `start` of x[T][H][D]: zero past T."""
    T = x.shape[0]
    out = np.zeros((n, x.shape[2]))
    for r in range(n):
        if start + r < T:
            out[r] = x[start + r, h]
    return out


def kernel_forward(q, k, v, cu_q, cu_k, hq, hkv, scale, causal, mutation=None):
    Tq, _, D = q.shape
    o = np.full((Tq, hq, D), np.nan)
    lse = np.full((Tq, hq), np.nan)
    writes = np.zeros((Tq, hq), dtype=int)
    seqs = len(cu_q) - 1
    max_q = max(cu_q[s + 1] - cu_q[s] for s in range(seqs))
    grid_x = -(-max_q // BM)
    sl2 = scale * LOG2E
    for seq in range(seqs):
        for h in range(hq):
            for bx in range(grid_x):
                tile = grid_x - 1 - bx
                i0 = tile * BM
                qs, lq = cu_q[seq], cu_q[seq + 1] - cu_q[seq]
                ks, lk = cu_k[seq], cu_k[seq + 1] - cu_k[seq]
                if i0 >= lq:
                    continue
                g = h // (hq // hkv)
                rows = min(BM, lq - i0)
                keys = visible(i0 + rows - 1, lq, lk, causal)
                n_tiles = -(-keys // BN)
                Qt = tma_rows(q, qs + i0, BM, h) if n_tiles > 0 else np.zeros((BM, D))
                for c in range(2):
                    wrow0 = i0 + 64 * c
                    rr = wrow0 + np.arange(64)
                    vis = np.array([visible(int(i), lq, lk, causal) for i in rr])
                    wg_keys = visible(min(wrow0 + 63, lq - 1), lq, lk, causal) if wrow0 < lq else 0
                    wg_keys_all = visible(wrow0, lq, lk, causal) if wrow0 < lq else 0
                    if mutation == "mask_every_row_sees_widest":
                        wg_keys_all = wg_keys
                    m = np.full(64, -np.inf)
                    l = np.zeros(64)
                    acc = np.zeros((64, D))
                    for t in range(n_tiles):
                        j0 = t * BN
                        if not j0 < wg_keys:
                            continue
                        Kt = tma_rows(k, ks + j0, BN, g)
                        Vt = tma_rows(v, ks + j0, BN, g)
                        S = Qt[64 * c:64 * c + 64] @ Kt.T
                        if j0 + BN > wg_keys_all:
                            cols = j0 + np.arange(BN)
                            S = np.where(cols[None, :] >= vis[:, None], -np.inf, S)
                        mx = S.max(axis=1)
                        mn = np.maximum(m, mx * sl2)
                        base = np.where(mn == -np.inf, 0.0, mn)
                        with np.errstate(invalid="ignore"):
                            alpha = np.exp2(m - base)
                        m = mn
                        P = np.exp2(S * sl2 - base[:, None])
                        l = l * alpha + P.sum(axis=1)
                        acc = acc * alpha[:, None] + bf16(P) @ Vt
                    inv = np.where(l > 0, 1.0 / np.where(l > 0, l, 1.0), 0.0)
                    out = bf16(acc * inv[:, None])
                    for r in range(64):
                        i = wrow0 + r
                        if i < lq:
                            o[qs + i, h] = out[r]
                            lse[qs + i, h] = (m[r] + np.log2(l[r])) * LN2 if l[r] > 0 else -np.inf
                            writes[qs + i, h] += 1
    return o, lse, writes


def reference_forward(q, k, v, cu_q, cu_k, hq, hkv, scale, causal):
    Tq, _, D = q.shape
    o = np.zeros((Tq, hq, D))
    lse = np.full((Tq, hq), -np.inf)
    for seq in range(len(cu_q) - 1):
        qs, lq = cu_q[seq], cu_q[seq + 1] - cu_q[seq]
        ks, lk = cu_k[seq], cu_k[seq + 1] - cu_k[seq]
        for h in range(hq):
            g = h // (hq // hkv)
            for i in range(lq):
                n = visible(i, lq, lk, causal)
                if n == 0:
                    continue
                s = q[qs + i, h] @ k[ks:ks + n, g].T * scale
                mx = s.max()
                p = np.exp(s - mx)
                o[qs + i, h] = p @ v[ks:ks + n, g] / p.sum()
                lse[qs + i, h] = mx + np.log(p.sum())
    return o, lse


def forward_errors(q_lens, k_lens, hq, hkv, D, causal, mutation=None):
    cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(int).tolist()
    cu_k = np.concatenate([[0], np.cumsum(k_lens)]).astype(int).tolist()
    q = bf16(rng.uniform(-2, 2, (cu_q[-1], hq, D)))
    k = bf16(rng.uniform(-2, 2, (max(cu_k[-1], 1), hkv, D)))[:cu_k[-1]]
    v = bf16(rng.uniform(-1, 1, (max(cu_k[-1], 1), hkv, D)))[:cu_k[-1]]
    scale = 1.0 / np.sqrt(D)
    o, lse, writes = kernel_forward(q, k, v, cu_q, cu_k, hq, hkv, scale, causal, mutation)
    o_ref, lse_ref = reference_forward(q, k, v, cu_q, cu_k, hq, hkv, scale, causal)
    problems = []
    if (writes != 1).any():
        problems.append(f"{int((writes != 1).sum())} (row, head) written {sorted(set(writes.ravel()))} times")
    if np.isnan(o).any() or np.isnan(lse).any():
        problems.append("rows left unwritten")
    none = lse_ref == -np.inf
    if not np.array_equal(lse == -np.inf, none):
        problems.append("lse = -inf on other rows than those that see no key")
    if (o[none] != 0).any():
        problems.append("o != 0 on a row that sees no key")
    den = np.linalg.norm(o_ref)
    e_o = np.linalg.norm(np.nan_to_num(o) - o_ref) / den if den > 0 else 0.0
    fin = ~none
    e_l = np.abs(np.nan_to_num(lse[fin]) - lse_ref[fin]).max() if fin.any() else 0.0
    return e_o, e_l, problems


def check_control_flow():
    cases = [
        ([1, 33, 130, 257, 300], [1, 33, 130, 257, 300], 4, 2, True),
        ([300, 129], [300, 129], 2, 2, False),
        ([200, 9], [20, 3], 2, 1, True),   # whole blocks and rows with no key
        ([3, 140], [8, 300], 2, 1, True),  # fewer queries than keys
        ([70, 0, 145], [70, 0, 145], 3, 1, True),
        ([128, 64, 65, 256], [128, 64, 65, 256], 1, 1, True),  # tile edges
        ([100], [0], 2, 1, False),
        ([40, 130], [260, 7], 2, 2, False),
    ]
    for q_lens, k_lens, hq, hkv, causal in cases:
        e_o, e_l, problems = forward_errors(q_lens, k_lens, hq, hkv, 64, causal)
        check(f"control flow q={q_lens} k={k_lens} h={hq}/{hkv}{' causal' if causal else ''}",
              not problems and e_o < 1e-2 and e_l < 1e-9,
              f"o rel err {e_o:.1e}, lse max err {e_l:.1e}" + ("; " + "; ".join(problems) if problems else ""))
    e_o, e_l, problems = forward_errors([300], [300], 1, 1, 64, True, mutation="mask_every_row_sees_widest")
    check("negative control: masking skipped below the widest row is caught", problems or e_o > 1e-2,
          f"o rel err {e_o:.1e}")


def main():
    check_fragment_maps()
    for D in (64, 80, 128):
        check_tile(D)
    bad = [(n, s, why) for n in (0, 1, 2, 3, 5, 8) for s in range(40) for (good, why) in [check_pipeline(n, s)] if not good]
    check("TMA ring: 240 random schedules, no tile overwritten in use, no deadlock", not bad, str(bad[:3]))
    # Negative controls: waiting on the producer's own parity deadlocks; an
    # empty barrier that completes on one consumer lets a tile be overwritten.
    wrong = [check_pipeline(5, s, producer_parity_flip=0)[1] for s in range(5)]
    check("negative control: producer waiting parity ph (not ph ^ 1) is caught", all(w for w in wrong), wrong[0])
    wrong = [check_pipeline(8, s, empty_count=128)[1] for s in range(40)]
    check("negative control: empty barrier of one consumer's count is caught", any(w for w in wrong),
          next((w for w in wrong if w), ""))
    check_negative_controls()
    check_control_flow()
    print("ALL OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
