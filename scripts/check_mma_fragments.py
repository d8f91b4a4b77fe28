#!/usr/bin/env python3
"""Host-side check of the warp-level index math of the tensor-core attention
kernels (kernels/flash_attn_tc.cu, kernels/paged_attn_tc.cu), no GPU needed.
It emulates ldmatrix (.x2/.x4, with and without .trans) and
mma.m16n8k16 by their PTX ISA fragment definitions (see
kernels/mma_bf16.cuh), feeds them the shared-memory row addresses the
kernels compute per lane (transcribed from the .cu files: keep them in
step), and compares every product with numpy's matmul:
  forward S = Q K^T (Q non-trans A, K non-trans x4 B pairs),
  forward O += P V (P from S's accumulators as A, V x4.trans B pairs),
  backward dQ = dS K (dS from dS^T x4.trans A, K x2.trans B);
the backward's S^T, dP^T, dV, dK and the paged decode use the same two
forward patterns. Exits 1 on a mismatch. Needs numpy (the reference venv).
"""
import numpy as np
rng = np.random.default_rng(0)

def ldsm(smem, addr_of_lane, nmat, trans):
    # addr_of_lane(l) -> (row, col) start of an 8-element row; lanes 8i..8i+7 give matrix i rows.
    mats = []
    for i in range(nmat):
        m = np.array([smem[r, c:c+8] for (r, c) in (addr_of_lane(8*i+j) for j in range(8))])
        mats.append(m.T if trans else m)
    # thread t gets for matrix i: (row t//4, cols 2(t%4), +1)
    return [[(mats[i][t//4, 2*(t%4)], mats[i][t//4, 2*(t%4)+1]) for i in range(nmat)] for t in range(32)]

def mma(a, b0, b1):
    # a[t] = 4 pairs, b0[t], b1[t] pairs -> C 16x8 via reconstructing A and B
    A = np.zeros((16,16)); B = np.zeros((16,8))
    for t in range(32):
        g, q = t//4, t%4
        A[g, 2*q:2*q+2] = a[t][0]; A[g+8, 2*q:2*q+2] = a[t][1]
        A[g, 2*q+8:2*q+10] = a[t][2]; A[g+8, 2*q+8:2*q+10] = a[t][3]
        B[2*q:2*q+2, g] = b0[t]; B[2*q+8:2*q+10, g] = b1[t]
    return A @ B

def c_to_matrix(cs):  # cs[t] = 4 floats -> 16x8
    C = np.zeros((16,8))
    for t in range(32):
        g, q = t//4, t%4
        C[g, 2*q:2*q+2] = cs[t][0:2]; C[g+8, 2*q:2*q+2] = cs[t][2:4]
    return C

ok = True
def check(name, got, want):
    global ok
    e = np.abs(got - want).max()
    print(f"{name}: max err {e:.2e}")
    ok &= e < 1e-9

D, BN, W = 32, 32, 2
Q = rng.standard_normal((16*W, D)); K = rng.standard_normal((BN, D)); V = rng.standard_normal((BN, D))
# forward S = Q K^T for warp w
for w in range(W):
    S = np.zeros((16, BN))
    for kk in range(D//16):
        qf = ldsm(Q, lambda l: (16*w + (l & 15), kk*16 + (l >> 4)*8), 4, False)
        for np_ in range(BN//16):
            b = ldsm(K, lambda l: (16*np_ + (l & 7) + ((l >> 4) << 3), kk*16 + ((l >> 3) & 1)*8), 4, False)
            S[:, 16*np_:16*np_+8] += mma(qf, [x[0] for x in b], [x[1] for x in b])
            S[:, 16*np_+8:16*np_+16] += mma(qf, [x[2] for x in b], [x[3] for x in b])
    check(f"fwd S warp {w}", S, Q[16*w:16*w+16] @ K.T)
    # O = P V with P from S accumulators (C layout -> A layout)
    P = rng.standard_normal((16, BN))
    # build per-thread C fragments of P for each 8-col tile n
    def cfrag(M, n):
        return [(M[t//4, 8*n+2*(t%4)], M[t//4, 8*n+2*(t%4)+1], M[t//4+8, 8*n+2*(t%4)], M[t//4+8, 8*n+2*(t%4)+1]) for t in range(32)]
    O = np.zeros((16, D))
    for kk in range(BN//16):
        c0, c1 = cfrag(P, 2*kk), cfrag(P, 2*kk+1)
        pa = [((c0[t][0], c0[t][1]), (c0[t][2], c0[t][3]), (c1[t][0], c1[t][1]), (c1[t][2], c1[t][3])) for t in range(32)]
        for dp in range(D//16):
            b = ldsm(V, lambda l: (16*kk + (l & 15), 16*dp + (l >> 4)*8), 4, True)
            O[:, 16*dp:16*dp+8] += mma(pa, [x[0] for x in b], [x[1] for x in b])
            O[:, 16*dp+8:16*dp+16] += mma(pa, [x[2] for x in b], [x[3] for x in b])
    check(f"fwd O warp {w}", O, P @ V)

# backward dQ = dS K, A from dS^T stored [key][query] via ldsm x4 trans; B = K via x2 trans
QT = 32
dST = rng.standard_normal((BN, QT))
for rt in range(QT//16):
    dq = np.zeros((16, D))
    for kk in range(BN//16):
        a = ldsm(dST, lambda l: (16*kk + (l & 7) + ((l >> 4) << 3), 16*rt + ((l >> 3) & 1)*8), 4, True)
        for n in range(D//8):
            b = ldsm(K, lambda l: (16*kk + (l & 15), 8*n), 2, True)
            dq[:, 8*n:8*n+8] += mma(a, [x[0] for x in b], [x[1] for x in b])
    check(f"bwd dQ rows {rt}", dq, dST.T[16*rt:16*rt+16] @ K)
print("ALL OK" if ok else "MISMATCH")
import sys
sys.exit(0 if ok else 1)
