#!/usr/bin/env python3
"""Host-side check of the sm_90a flash-attention backward
(kernels/flash_attn_wgmma_bwd.cu), no GPU needed. Exits 1 on a mismatch.

The hardware models (TMA tiled copy with swizzle, the wgmma descriptor and
its K-major / MN-major operand addressing, the m64nNk16 accumulator and
register-A fragment maps, mbarrier phases) are check_wgmma_fragments.py's,
written from the PTX ISA and CUTLASS's canonical layouts; this file adds an
MN-major A operand (imm-trans-a = 1, the dS of dQ = dS K) and transcribes
the backward kernel's formulas (keep in step with the .cu):
  FaWbLayout (offsets, panels), the per-k-step descriptors of S^T = K Q^T,
  dP^T = V dO^T (both K-major), dV += P^T dO and dK += dS^T Q (RS, B
  MN-major), dQ = dS K (A = the staged dS^T read MN-major, B = K MN-major),
  the packing of the accumulators into A fragments, the dS^T staging
  (fa_wg_swz<64>), the dK/dV staging, the barrier protocol (full = TMA bytes
  + warp 1's 32 arrivals, empty = 256 consumer arrivals) and the block's
  walk (key blocks, query heads of the group, query tiles from qt_first,
  `active`, `need_mask`, lse -> log2 with +inf for rows that must give
  P = 0, delta 0 past the sequence, the dQ row guard, the keys stored).

Checks: per head dim (64, 80, 128), consumer warpgroup and stage, every
product through the descriptor/fragment models equals numpy's; the staging
round-trips, is bank-conflict free and stays in the warpgroup's rows; the
shared-memory map is disjoint, aligned and fits; descriptor fields fit; a
randomised simulation of the ring never lets a stage be refilled while read
(nor read before both producers filled it) and never deadlocks; the whole
algorithm at matrix level (with bf16 rounding where the kernel rounds)
against a float64 attention backward on varlen, causal/bidirectional, GQA
shapes with rows that see no key, unequal query/key lengths and an empty
sequence. Negative controls (a planted mistake each) must each be caught.
"""
import sys

import numpy as np

import check_wgmma_fragments as hw
from check_wgmma_fragments import (
    Smem,
    acc_coord,
    acc_matrix,
    afrag_coord,
    bf16,
    operand_addr,
    tma_load_3d,
    wg_desc,
    wgmma_rs,
    wgmma_rs_matrix,
)

rng = np.random.default_rng(11)
ok = True


def check(name, cond, detail=""):
    global ok
    print(f"{'ok  ' if cond else 'FAIL'} {name}{(': ' + detail) if detail else ''}")
    ok &= bool(cond)


# ============================ hardware model addition ====================


def wgmma_ss_general(acc, smem, desc_a, desc_b, n, trans_a, trans_b, scale_d):
    """SS wgmma with A K-major (trans_a = 0) or MN-major (trans_a = 1)."""
    major = "MN" if trans_a else "K"
    A = np.array([[smem.read(operand_addr(desc_a, m, k, major)) for k in range(16)] for m in range(64)])
    return wgmma_rs_matrix(acc, A, smem, desc_b, n, trans_b, scale_d)


# ========================= kernel transcription ==========================
BN, QT, STAGES = 128, 64, 2
DS_BYTES = 64 * QT * 2


class Layout:  # FaWbLayout<D>
    def __init__(self, D):
        self.D = D
        self.PW = 64 if D % 64 == 0 else 16
        self.RB = 2 * self.PW
        self.PANELS = D // self.PW
        self.SBO = 8 * self.RB
        self.SWIZZLE = 1 if self.RB == 128 else 3
        self.KV_BYTES = self.PANELS * BN * self.RB
        self.QT_BYTES = self.PANELS * QT * self.RB
        self.K_OFF = 0
        self.V_OFF = self.KV_BYTES
        self.Q_OFF = 2 * self.KV_BYTES
        self.DO_OFF = self.Q_OFF + STAGES * self.QT_BYTES
        self.DS_OFF = self.DO_OFF + STAGES * self.QT_BYTES
        self.LSE_OFF = self.DS_OFF + 2 * DS_BYTES
        self.BAR_OFF = self.LSE_OFF + STAGES * 2 * QT * 4
        self.SMEM_BYTES = self.BAR_OFF + 64 + 1024


class FwdSwz:  # the PW/RB fa_wg_swz<PW>() reads
    def __init__(self, pw):
        self.PW, self.RB = pw, 2 * pw


def swz(pw, row, col, rows_per_panel):  # fa_wg_swz<PW>()
    return hw.fa_wg_swz(FwdSwz(pw), row, col, rows_per_panel)


def pack_frags(acc, n_kq):
    """pa[kq][r] = pack_bf16(acc[8 kq + 2 r], acc[8 kq + 2 r + 1]) per thread."""
    return [[[(bf16(acc[t][8 * kq + 2 * r]), bf16(acc[t][8 * kq + 2 * r + 1])) for r in range(4)]
             for kq in range(n_kq)] for t in range(128)]


def tile_products(D, c, s, mutation=None):
    """One consumer warpgroup's products for one stage, built as the kernel
    builds its loads, descriptors, fragments and staging. Returns the errors
    of S^T, dP^T, dV, dK, dQ against numpy."""
    L = Layout(D)
    base = 1024 * 3  # the kernel rounds its window up to 1024
    smem = Smem(base + L.SMEM_BYTES)
    Hq, Hkv, T = 3, 2, 300
    Q = bf16(rng.standard_normal((T, Hq, D)))
    dO = bf16(rng.standard_normal((T, Hq, D)))
    K = bf16(rng.standard_normal((T, Hkv, D)))
    V = bf16(rng.standard_normal((T, Hkv, D)))
    h, g, q_row0, k_row0 = 2, 1, 250, 190  # rows past T (300) read as 0
    k_s, v_s = base + L.K_OFF, base + L.V_OFF
    qb, dob = base + L.Q_OFF + s * L.QT_BYTES, base + L.DO_OFF + s * L.QT_BYTES
    span = L.RB
    for p in range(L.PANELS):
        tma_load_3d(smem, k_s + p * BN * L.RB, K, (L.PW, 1, BN), (L.PW * p, g, k_row0), span)
        tma_load_3d(smem, v_s + p * BN * L.RB, V, (L.PW, 1, BN), (L.PW * p, g, k_row0), span)
        tma_load_3d(smem, qb + p * QT * L.RB, Q, (L.PW, 1, QT), (L.PW * p, h, q_row0), span)
        tma_load_3d(smem, dob + p * QT * L.RB, dO, (L.PW, 1, QT), (L.PW * p, h, q_row0), span)
    Kc = hw.tma_rows(K, k_row0, BN, g)[64 * c:64 * c + 64]
    Vc = hw.tma_rows(V, k_row0, BN, g)[64 * c:64 * c + 64]
    Qt = hw.tma_rows(Q, q_row0, QT, h)
    dOt = hw.tma_rows(dO, q_row0, QT, h)

    # S^T, dP^T: KD k-steps, A = K/V rows 64 c.., B = Q/dO, both K-major.
    st = [[0.0] * 32 for _ in range(128)]
    dpt = [[0.0] * 32 for _ in range(128)]
    for kk in range(D // 16):
        p, kin = 16 * kk // L.PW, (16 * kk % L.PW) * 2
        a_off = p * BN * L.RB + 64 * c * L.RB + kin
        b_off = p * QT * L.RB + kin
        st = wgmma_ss_general(st, smem, wg_desc(k_s + a_off, 16, L.SBO, L.SWIZZLE),
                              wg_desc(qb + b_off, 16, L.SBO, L.SWIZZLE), 64, 0, 0, kk > 0)
        dpt = wgmma_ss_general(dpt, smem, wg_desc(v_s + a_off, 16, L.SBO, L.SWIZZLE),
                               wg_desc(dob + b_off, 16, L.SBO, L.SWIZZLE), 64, 0, 0, kk > 0)
    S_ref, dP_ref = Kc @ Qt.T, Vc @ dOt.T
    errs = {"S^T": np.abs(acc_matrix(st, 64) - S_ref).max(),
            "dP^T": np.abs(acc_matrix(dpt, 64) - dP_ref).max()}

    # Stand-ins for P^T and dS^T (any values: the layouts are under test).
    P = 0.1 * acc_matrix(st, 64)
    dS = 0.01 * acc_matrix(dpt, 64)
    pt = [[0.0] * 32 for _ in range(128)]
    dst = [[0.0] * 32 for _ in range(128)]
    for t in range(128):
        for i in range(32):
            m, j = acc_coord(t, i)
            pt[t][i], dst[t][i] = P[m, j], dS[m, j]
    pa, dsa = pack_frags(pt, QT // 16), pack_frags(dst, QT // 16)
    if mutation == "pack_order":  # registers 1 and 2 swapped
        pa = [[[f[0], f[2], f[1], f[3]] for f in th] for th in pa]

    # dV += P^T dO, dK += dS^T Q: k-steps of 16 queries, B MN-major.
    dv = [[0.0] * (D // 2) for _ in range(128)]
    dk = [[0.0] * (D // 2) for _ in range(128)]
    lbo = QT * L.RB if mutation != "lbo" else BN * L.RB
    for kq in range(QT // 16):
        at = kq * 16 * L.RB
        dv = wgmma_rs(dv, [pa[t][kq] for t in range(128)], smem,
                      wg_desc(dob + at, lbo, L.SBO, L.SWIZZLE), D, 1, True)
        dk = wgmma_rs(dk, [dsa[t][kq] for t in range(128)], smem,
                      wg_desc(qb + at, lbo, L.SBO, L.SWIZZLE), D, 1, True)
    errs["dV"] = np.abs(acc_matrix(dv, D) - bf16(P) @ dOt).max()
    errs["dK"] = np.abs(acc_matrix(dk, D) - bf16(dS) @ Qt).max()

    # dS^T staging: row 16 w + group (+8), query 16 kq + 8 half + 2 quad.
    ds_s = base + L.DS_OFF + c * DS_BYTES
    for t in range(128):
        w, lane = t // 32, t % 32
        grp, quad = lane // 4, lane % 4
        lr = 16 * w + grp
        for kq in range(QT // 16):
            for half in range(2):
                col = 16 * kq + 8 * half + 2 * quad
                for rr, reg in ((lr, dsa[t][kq][2 * half]), (lr + 8, dsa[t][kq][2 * half + 1])):
                    if mutation == "ds_no_swizzle":
                        off = rr * 128 + col * 2
                    else:
                        off = swz(64, rr, col, 64)
                    smem.write(ds_s + off, reg[0])
                    smem.write(ds_s + off + 2, reg[1])
    # dQ = dS K: A = dS^T read MN-major, B = K rows of the warpgroup's keys, MN-major.
    dq = [[0.0] * (D // 2) for _ in range(128)]
    trans_a = 0 if mutation == "dq_a_kmajor" else 1
    for kk in range(4):
        da = wg_desc(ds_s + kk * 16 * 128, 16, 1024, 1)
        db = wg_desc(k_s + (64 * c + 16 * kk) * L.RB, BN * L.RB, L.SBO, L.SWIZZLE)
        dq = wgmma_ss_general(dq, smem, da, db, D, trans_a, 1, kk > 0)
    errs["dQ"] = np.abs(acc_matrix(dq, D) - bf16(dS).T @ Kc).max()
    return errs


def check_tiles():
    for D in (64, 80, 128):
        L = Layout(D)
        for c, s in ((0, 0), (1, 1), (1, 0)):
            e = tile_products(D, c, s)
            worst = max(e.values())
            check(f"d={D} warpgroup {c} stage {s}: S^T, dP^T, dV, dK, dQ through TMA/descriptor/"
                  f"fragment models equal numpy", worst < 1e-9, f"{ {k: float(v) for k, v in e.items()} }")
        regions = [("K", L.K_OFF, L.KV_BYTES), ("V", L.V_OFF, L.KV_BYTES),
                   ("Q", L.Q_OFF, STAGES * L.QT_BYTES), ("dO", L.DO_OFF, STAGES * L.QT_BYTES),
                   ("dS", L.DS_OFF, 2 * DS_BYTES), ("lse", L.LSE_OFF, STAGES * 2 * QT * 4),
                   ("bar", L.BAR_OFF, 40)]
        disjoint = all(a[1] + a[2] <= b[1] for a, b in zip(regions, regions[1:]))
        check(f"d={D}: shared-memory regions are disjoint and in order", disjoint)
        check(f"d={D}: shared memory fits sm_90 ({L.SMEM_BYTES} bytes <= 227 KiB)",
              L.SMEM_BYTES <= 227 * 1024)
        panels = ([L.K_OFF + p * BN * L.RB for p in range(L.PANELS)]
                  + [L.V_OFF + p * BN * L.RB for p in range(L.PANELS)]
                  + [off + s * L.QT_BYTES + p * QT * L.RB for off in (L.Q_OFF, L.DO_OFF)
                     for s in range(STAGES) for p in range(L.PANELS)]
                  + [L.DS_OFF, L.DS_OFF + DS_BYTES])
        check(f"d={D}: every TMA panel and dS^T tile starts on a 1024-byte swizzle period",
              all(x % 1024 == 0 for x in panels))
        # The warpgroup's K/V rows start on a swizzle period (base offset 0).
        check(f"d={D}: warpgroup 1's K/V rows start on a swizzle period",
              (64 * L.RB) % (8 * L.RB) == 0 and (64 * L.RB) % 256 == 0)
        fields = [16, L.SBO, QT * L.RB, BN * L.RB, 1024]
        check(f"d={D}: LBO/SBO values fit the 14-bit fields", all((f >> 4) < (1 << 14) for f in fields))
        check(f"d={D}: the window's addresses fit the descriptor's 18-bit start field",
              1024 + L.SMEM_BYTES < (1 << 18))
        check_dkdv_staging(L)
    check_ds_banks()


def check_ds_banks():
    """A warp's 4-byte dS^T writes (8 rows x 4 quads per register) hit 32 banks."""
    good = True
    for w in range(4):
        for kq in range(QT // 16):
            for half in range(2):
                for plus in (0, 8):
                    banks = set()
                    for lane in range(32):
                        grp, quad = lane // 4, lane % 4
                        off = swz(64, 16 * w + grp + plus, 16 * kq + 8 * half + 2 * quad, 64)
                        banks.add((off // 4) % 32)
                    good &= len(banks) == 32
    check("dS^T staging writes hit 32 distinct banks", good)


def check_dkdv_staging(L):
    D = L.D
    M = rng.standard_normal((BN, D))
    store = {}
    for c in range(2):
        for t in range(128):
            w, lane = t // 32, t % 32
            grp, quad = lane // 4, lane % 4
            lr = 64 * c + 16 * w + grp
            for n in range(D // 8):
                col = 8 * n + 2 * quad
                for rr in (lr, lr + 8):
                    for e in range(2):
                        off = swz(L.PW, rr, col + e, BN)
                        assert off not in store
                        store[off] = (rr, M[rr, col + e])
    # Warp (c, w) reads back its 16 rows chunk by chunk; every row lies in
    # the warpgroup's own rows and returns what was written.
    good, inside = True, True
    for c in range(2):
        for w in range(4):
            for r in range(16):
                lr = 64 * c + 16 * w + r
                for ch in range(D // 8):
                    for e in range(8):
                        row, val = store[swz(L.PW, lr, 8 * ch + e, BN)]
                        good &= val == M[lr, 8 * ch + e]
                        inside &= 64 * c <= row < 64 * c + 64
    check(f"d={D}: dK/dV staging round-trips every element in the warpgroup's own rows",
          good and inside and len(store) == BN * D)


def check_negative_tiles():
    for mut, what in (("pack_order", "P fragments packed in the wrong register order"),
                      ("lbo", "dO/Q MN-major LBO of the K/V tile"),
                      ("ds_no_swizzle", "dS^T staged without the swizzle"),
                      ("dq_a_kmajor", "dS^T read K-major as dQ's A")):
        check(f"negative control: {what} is caught", tile_caught(128, 1, 1, mut))
    check("negative control (d=80): dO/Q MN-major LBO of the K/V tile is caught",
          tile_caught(80, 0, 0, "lbo"))


def tile_caught(D, c, s, mutation):
    """A planted mistake shows as a wrong product or as a read of shared
    memory that nothing wrote (Smem raises: outside every loaded tile)."""
    try:
        return max(tile_products(D, c, s, mutation=mutation).values()) > 1e-3
    except (KeyError, AssertionError):
        return True


# ============================ the ring ===================================


def check_ring(n_tiles, seed, full_count=33, parity_flip=1, empty_count=256):
    """TMA thread + warp 1 (lse/delta) + 2 consumers over the 2-stage ring.
    full[s] expects 1 (expect_tx) + 32 (warp 1's lanes, one unit here) and
    the bytes; a consumer reads Q/dO and lse/delta of the stage."""
    r = np.random.default_rng(seed)

    full = [hw.MBarrier(full_count) for _ in range(STAGES)]
    empty = [hw.MBarrier(empty_count) for _ in range(STAGES)]
    tma_tile, lse_tile = [None] * STAGES, [None] * STAGES
    in_use = [set() for _ in range(STAGES)]
    inflight = []
    prod = {"tma": 0, "w1": 0}
    cons_t, cons_state = [0, 0], ["wait", "wait"]
    steps = 0
    while (min(prod.values()) < n_tiles or inflight or min(cons_t) < n_tiles) and steps < 100000:
        steps += 1
        actors = [a for a in ("tma", "w1") if prod[a] < n_tiles]
        if inflight:
            actors.append("land")
        actors += [f"c{c}" for c in range(2) if cons_t[c] < n_tiles]
        a = actors[r.integers(len(actors))]
        if a in ("tma", "w1"):
            t = prod[a]
            s, ph = t % STAGES, (t // STAGES) & 1
            if empty[s].done(ph ^ parity_flip):
                if in_use[s]:
                    return False, f"{a} refills stage {s} while {in_use[s]} read it"
                if a == "tma":
                    full[s].arrive(1, tx=100)
                    inflight.append((s, t))
                else:
                    lse_tile[s] = t
                    full[s].arrive(32)
                prod[a] += 1
        elif a == "land":
            s, t = inflight.pop(0)
            tma_tile[s] = t
            full[s].complete_tx(100)
        else:
            c = int(a[1])
            t = cons_t[c]
            s, ph = t % STAGES, (t // STAGES) & 1
            if cons_state[c] == "wait":
                if full[s].done(ph):
                    if tma_tile[s] != t or lse_tile[s] != t:
                        return False, f"consumer {c} saw tiles {tma_tile[s]}/{lse_tile[s]} for {t}"
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


# ====================== the algorithm at matrix level ====================
LOG2E = 1.4426950408889634


def kernel_backward(q, k, v, do, lse, delta, cu_q, cu_k, hq, hkv, scale, causal, mutation=None):
    """fa_wg_bwd's grid, walk and per-warpgroup arithmetic at matrix level
    (the fragment/descriptor level is checked tile by tile above). TMA rows
    past the tensor are 0, rows past a sequence are the next one's."""
    Tq, _, D = q.shape
    Tk = k.shape[0]
    dq_acc = np.zeros((Tq, hq, D))
    dk = np.full((Tk, hkv, D), np.nan)
    dv = np.full((Tk, hkv, D), np.nan)
    seqs = len(cu_q) - 1
    max_k = max([cu_k[s + 1] - cu_k[s] for s in range(seqs)] + [0])
    sl2 = scale * LOG2E
    gs = hq // hkv
    for seq in range(seqs):
        for g in range(hkv):
            for bx in range(-(-max_k // BN)):
                j0 = bx * BN
                qs, lq = cu_q[seq], cu_q[seq + 1] - cu_q[seq]
                ks, lk = cu_k[seq], cu_k[seq + 1] - cu_k[seq]
                if j0 >= lk:
                    continue
                shift = lk - lq
                qt_first = max(0, j0 - shift) // QT if causal else 0
                if mutation == "qt_first_late":
                    qt_first = max(0, j0 - shift + QT) // QT if causal else 0
                n_qt = max(0, -(-lq // QT) - qt_first)
                Kt, Vt = hw.tma_rows(k, ks + j0, BN, g), hw.tma_rows(v, ks + j0, BN, g)
                dk_acc = np.zeros((BN, D))
                dv_acc = np.zeros((BN, D))
                for t in range(gs * n_qt):
                    h = g * gs + t // n_qt
                    i0 = (qt_first + t % n_qt) * QT
                    Qt, dOt = hw.tma_rows(q, qs + i0, QT, h), hw.tma_rows(do, qs + i0, QT, h)
                    # warp 1: lse in log2 units (+inf: P = 0), delta (0 past the sequence).
                    lse2, dl = np.full(QT, np.inf), np.zeros(QT)
                    for r in range(QT):
                        valid = i0 + r < lq
                        if mutation == "no_row_guard":
                            valid = qs + i0 + r < Tq
                        if valid:
                            l = lse[qs + i0 + r, h]
                            lse2[r] = l * LOG2E if np.isfinite(l) else np.inf
                            dl[r] = delta[qs + i0 + r, h]
                    last_q = min(i0 + QT, lq) - 1
                    for c in range(2):
                        wk0 = j0 + 64 * c
                        active = wk0 < lk and (not causal or wk0 <= last_q + shift)
                        if mutation == "inactive_wg1" and c == 1:
                            active = False
                        if not active:
                            continue
                        need_mask = wk0 + 64 > lk or (causal and wk0 + 63 > i0 + shift)
                        Kc, Vc = Kt[64 * c:64 * c + 64], Vt[64 * c:64 * c + 64]
                        St = Kc @ Qt.T
                        dPt = Vc @ dOt.T
                        with np.errstate(invalid="ignore", over="ignore"):
                            P = np.exp2(St * sl2 - lse2[None, :])
                        if need_mask and mutation != "no_mask":
                            key = wk0 + np.arange(64)[:, None]
                            col = i0 + np.arange(QT)[None, :]
                            P[(key >= lk) | (causal & (key > col + shift))] = 0.0
                        dS = P * (dPt - dl[None, :])
                        Pb, dSb = bf16(P), bf16(dS)
                        dv_acc[64 * c:64 * c + 64] += Pb @ dOt
                        dk_acc[64 * c:64 * c + 64] += dSb @ Qt
                        dqp = dSb.T @ Kc
                        for r in range(QT):
                            if i0 + r < lq or mutation == "no_dq_guard":
                                # Rows past the sequence add exact zeros (P = 0
                                # there); the guard keeps the last sequence's
                                # tile from writing past the tensor.
                                if qs + i0 + r >= Tq:
                                    raise IndexError(f"dq row {qs + i0 + r} past {Tq} tokens")
                                dq_acc[qs + i0 + r, h] += scale * dqp[r]
                for r in range(BN):
                    if j0 + r < lk:
                        dk[ks + j0 + r, g] = bf16(scale * dk_acc[r])
                        dv[ks + j0 + r, g] = bf16(dv_acc[r])
    return bf16(dq_acc), dk, dv


def reference(q, k, v, do, cu_q, cu_k, hq, hkv, scale, causal):
    """float64 attention forward (o, natural-log lse) and backward."""
    Tq, _, D = q.shape
    o, lse = np.zeros_like(q), np.full((Tq, hq), -np.inf)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    gs = hq // hkv
    for s in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        lq, lk = qe - qs, ke - ks
        for h in range(hq):
            g = h // gs
            S = scale * q[qs:qe, h] @ k[ks:ke, g].T
            if causal:
                i = np.arange(lq)[:, None]
                j = np.arange(lk)[None, :]
                S = np.where(j <= i + lk - lq, S, -np.inf)
            m = S.max(axis=1, initial=-np.inf)
            seen = np.isfinite(m)
            P = np.zeros_like(S)
            P[seen] = np.exp(S[seen] - m[seen, None])
            l = P.sum(axis=1)
            P[seen] /= l[seen, None]
            lse[qs:qe, h][seen] = m[seen] + np.log(l[seen])
            o[qs:qe, h] = P @ v[ks:ke, g]
            dO = do[qs:qe, h]
            dP = dO @ v[ks:ke, g].T
            dl = (dO * o[qs:qe, h]).sum(axis=1)
            dS = P * (dP - dl[:, None])
            dq[qs:qe, h] = scale * dS @ k[ks:ke, g]
            dk[ks:ke, g] += scale * dS.T @ q[qs:qe, h]
            dv[ks:ke, g] += P.T @ dO
    return o, lse, dq, dk, dv


def backward_errors(q_lens, k_lens, hq, hkv, D, causal, mutation=None, seed=0):
    r = np.random.default_rng(seed)
    cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(int)
    cu_k = np.concatenate([[0], np.cumsum(k_lens)]).astype(int)
    q = bf16(r.standard_normal((cu_q[-1], hq, D)))
    k = bf16(r.standard_normal((cu_k[-1], hkv, D)))
    v = bf16(r.standard_normal((cu_k[-1], hkv, D)))
    do = bf16(r.standard_normal((cu_q[-1], hq, D)))
    scale = D ** -0.5
    o, lse, dq_r, dk_r, dv_r = reference(q, k, v, do, cu_q, cu_k, hq, hkv, scale, causal)
    # The kernel's inputs: bf16 o (delta from it, as flash_attn_bwd_delta), f32 lse.
    delta = (do * bf16(o)).sum(axis=2).astype(np.float32).astype(np.float64)
    lse32 = lse.astype(np.float32).astype(np.float64)
    dq, dk, dv = kernel_backward(q, k, v, do, lse32, delta, cu_q, cu_k, hq, hkv, scale, causal,
                                 mutation)
    errs = {}
    for name, got, want in (("dq", dq, dq_r), ("dk", dk, dk_r), ("dv", dv, dv_r)):
        if np.isnan(got).any():
            errs[name] = np.inf  # a key row never stored
            continue
        errs[name] = float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))
    return errs


CASES = [
    # (q lens, k lens, hq, hkv, D, causal, what)
    ([1, 70, 0, 130, 200], [1, 70, 0, 130, 200], 4, 2, 64, True, "causal GQA 4/2 packed odd lengths incl. 1 and 0"),
    ([1, 70, 0, 130, 200], [1, 70, 0, 130, 200], 4, 2, 64, False, "bidirectional GQA 4/2 packed"),
    ([300], [300], 2, 1, 80, True, "causal single 300-token sequence, d=80"),
    ([150, 40], [90, 170], 3, 1, 64, True, "causal lq != lk (rows that see no key; keys no query sees)"),
    ([129, 64], [129, 64], 2, 2, 128, False, "bidirectional d=128 at tile edges"),
]


def check_algorithm():
    for q_lens, k_lens, hq, hkv, D, causal, what in CASES:
        e = backward_errors(q_lens, k_lens, hq, hkv, D, causal)
        check(f"algorithm vs float64 backward: {what}", max(e.values()) < 2e-2, str(e))
    base = ([1, 70, 0, 130, 200], [1, 70, 0, 130, 200], 4, 2, 64, True)
    for mut, what in (("no_mask", "masking skipped"),
                      ("qt_first_late", "causal walk starting one query tile late"),
                      ("no_dq_guard", "dq rows past the sequence not guarded"),
                      ("inactive_wg1", "warpgroup 1 never active")):
        try:
            e = backward_errors(*base, mutation=mut)
            check(f"negative control: {what} is caught", max(e.values()) > 5e-2, str(e))
        except IndexError as err:
            check(f"negative control: {what} is caught", True, f"out of bounds: {err}")
    e = backward_errors([150, 40], [90, 170], 3, 1, 64, True, mutation="no_row_guard")
    check("negative control: lse/delta rows past the sequence read as real rows is caught",
          max(e.values()) > 5e-2, str(e))


def main():
    check_tiles()
    check_negative_tiles()
    bad = [m for seed in range(200) for n in (1, 2, 3, 7) for okk, m in [check_ring(n, seed)] if not okk]
    check("ring: 800 random schedules, no stage refilled while read, none read early, no deadlock",
          not bad, str(bad[:3]))
    wrong = [check_ring(5, seed, full_count=1)[0] for seed in range(50)]
    check("negative control: full barrier without warp 1's arrivals is caught", not all(wrong))
    wrong = [check_ring(5, seed, parity_flip=0)[0] for seed in range(20)]
    check("negative control: producers waiting parity ph (not ph ^ 1) is caught", not any(wrong))
    wrong = [check_ring(5, seed, empty_count=128)[0] for seed in range(50)]
    check("negative control: empty barrier of one consumer's count is caught", not all(wrong))
    check_algorithm()
    print("ALL OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
