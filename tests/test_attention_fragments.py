"""The fragment bookkeeping of the CUDA attention kernels, checked on the CPU (no GPU needed).

The tensor-core kernels (csrc/cuda/attention/attn_fwd.cuh, attn_bwd.cuh) move data through an
XOR-swizzled shared-memory layout, ldmatrix (plain and .trans) and mma.sync m16n8k16 fragments, and
re-pack mma accumulators as operands of the next product. One wrong index there gives garbage on
the GPU. This file emulates those PTX instructions per lane with numpy (semantics from the PTX ISA)
and runs the kernels' index expressions, transcribed verbatim, for every head dim: Q K^T and P V
(forward) and K Q^T, V dO^T, P^T dO, dS^T Q, dS K through the dS^T tile (backward), plus the
epilogue's round trip through shared memory. It checks the products, not softmax or masking (the
CUDA tests do that on a GPU). Keep it in sync with the kernels when their indexing changes.
"""
import numpy as np
import pytest

rng = np.random.default_rng(0)


def swz(W, r, c):
    if W == 16: return r * W + ((c ^ ((r >> 2) & 1)) << 3)
    if W == 32: return r * W + ((c ^ ((r >> 1) & 3)) << 3)
    return r * W + ((c ^ (r & 7)) << 3)


def store_tile(W, rows, M):  # M (rows, W) -> flat swizzled
    s = np.zeros(rows * W)
    for r in range(rows):
        for c in range(W // 8):
            s[swz(W, r, c): swz(W, r, c) + 8] = M[r, c * 8:(c + 1) * 8]
    return s


def ldm(smem, addrs, nmat, trans):
    # addrs: per-lane element offsets (32). returns regs[lane][m] = (lo, hi)
    out = [[None] * nmat for _ in range(32)]
    for l in range(32):
        g, t = l // 4, l % 4
        for m in range(nmat):
            if not trans:
                a = addrs[8 * m + g]
                out[l][m] = (smem[a + 2 * t], smem[a + 2 * t + 1])
            else:
                out[l][m] = (smem[addrs[8 * m + 2 * t] + g], smem[addrs[8 * m + 2 * t + 1] + g])
    return out


def mma(C, A, B0, B1):
    # C[lane] = 4 floats; A[lane] = 4 pairs; B0/B1[lane] = pairs
    Am = np.zeros((16, 16)); Bm = np.zeros((16, 8))
    for l in range(32):
        g, t = l // 4, l % 4
        Am[g, 2*t:2*t+2] = A[l][0]; Am[g+8, 2*t:2*t+2] = A[l][1]
        Am[g, 2*t+8:2*t+10] = A[l][2]; Am[g+8, 2*t+8:2*t+10] = A[l][3]
        Bm[2*t:2*t+2, g] = B0[l]; Bm[2*t+8:2*t+10, g] = B1[l]
    Cm = Am @ Bm
    for l in range(32):
        g, t = l // 4, l % 4
        C[l][0] += Cm[g, 2*t]; C[l][1] += Cm[g, 2*t+1]; C[l][2] += Cm[g+8, 2*t]; C[l][3] += Cm[g+8, 2*t+1]


def c_to_mat(frags, rows=16):  # frags[n][lane][4] -> (16, 8*len)
    M = np.zeros((rows, 8 * len(frags)))
    for n, F in enumerate(frags):
        for l in range(32):
            g, t = l // 4, l % 4
            M[g, n*8+2*t:n*8+2*t+2] = F[l][0:2]; M[g+8, n*8+2*t:n*8+2*t+2] = F[l][2:4]
    return M


def check_forward(D):
    kBr, kBc = 64, 64
    Q = rng.standard_normal((kBr, D)); K = rng.standard_normal((kBc, D)); V = rng.standard_normal((kBc, D))
    sQ, sK, sV = store_tile(D, kBr, Q), store_tile(D, kBc, K), store_tile(D, kBc, V)
    for warp in range(4):
        s = [[[0.0] * 4 for _ in range(32)] for _ in range(kBc // 8)]
        for ks in range(D // 16):
            a = ldm(sQ, [swz(D, warp * 16 + (l % 16), ks * 2 + l // 16) for l in range(32)], 4, False)
            for np_ in range(kBc // 16):
                bb = ldm(sK, [swz(D, np_ * 16 + (l % 8) + (l // 16) * 8, ks * 2 + (l // 8) % 2) for l in range(32)], 4, False)
                mma(s[2*np_], a, [x[0] for x in bb], [x[1] for x in bb])
                mma(s[2*np_+1], a, [x[2] for x in bb], [x[3] for x in bb])
        S = c_to_mat(s)
        assert np.allclose(S, Q[warp*16:warp*16+16] @ K.T), "S"
        acc = [[[0.0] * 4 for _ in range(32)] for _ in range(D // 8)]
        for kk in range(kBc // 16):
            a = [[(s[2*kk][l][0], s[2*kk][l][1]), (s[2*kk][l][2], s[2*kk][l][3]), (s[2*kk+1][l][0], s[2*kk+1][l][1]), (s[2*kk+1][l][2], s[2*kk+1][l][3])] for l in range(32)]
            for dp in range(D // 16):
                bb = ldm(sV, [swz(D, kk * 16 + (l % 8) + ((l // 8) & 1) * 8, dp * 2 + l // 16) for l in range(32)], 4, True)
                mma(acc[2*dp], a, [x[0] for x in bb], [x[1] for x in bb])
                mma(acc[2*dp+1], a, [x[2] for x in bb], [x[3] for x in bb])
        O = c_to_mat(acc)
        assert np.allclose(O, S @ V), "O"
        # epilogue: write O to sQ rows, read back chunks
        for d in range(D // 8):
            for l in range(32):
                g, t4 = l // 4, l % 4
                for r in range(2):
                    rr, col = warp * 16 + g + 8 * r, d * 8 + 2 * t4
                    off = swz(D, rr, col // 8) + col % 8
                    sQ[off:off+2] = acc[d][l][2*r:2*r+2]
        for it in range(16 * (D // 8) // 32):
            for l in range(32):
                idx = l + it * 32
                rr, c = warp * 16 + idx // (D // 8), idx % (D // 8)
                assert np.allclose(sQ[swz(D, rr, c):swz(D, rr, c)+8], O[rr - warp*16, c*8:c*8+8]), "epi"


def check_backward(D):
    kBc = 64; kBr = 16 if D >= 128 else 64; kNT = kBr // 8; kDQ = D // 32
    K = rng.standard_normal((kBc, D)); V = rng.standard_normal((kBc, D))
    Q = rng.standard_normal((kBr, D)); dO = rng.standard_normal((kBr, D))
    sK, sV, sQ, sdO = store_tile(D, kBc, K), store_tile(D, kBc, V), store_tile(D, kBr, Q), store_tile(D, kBr, dO)
    sdS = np.zeros(kBc * kBr)
    DS_full = np.zeros((kBc, kBr))
    for warp in range(4):
        st = [[[0.0]*4 for _ in range(32)] for _ in range(kNT)]; dpt = [[[0.0]*4 for _ in range(32)] for _ in range(kNT)]
        for ks in range(D // 16):
            ak = ldm(sK, [swz(D, warp*16 + (l % 16), ks*2 + l // 16) for l in range(32)], 4, False)
            av = ldm(sV, [swz(D, warp*16 + (l % 16), ks*2 + l // 16) for l in range(32)], 4, False)
            for np_ in range(kNT // 2):
                addr = [swz(D, np_*16 + (l % 8) + (l // 16)*8, ks*2 + (l // 8) % 2) for l in range(32)]
                bq = ldm(sQ, addr, 4, False); bo = ldm(sdO, addr, 4, False)
                mma(st[2*np_], ak, [x[0] for x in bq], [x[1] for x in bq]); mma(st[2*np_+1], ak, [x[2] for x in bq], [x[3] for x in bq])
                mma(dpt[2*np_], av, [x[0] for x in bo], [x[1] for x in bo]); mma(dpt[2*np_+1], av, [x[2] for x in bo], [x[3] for x in bo])
        ST = c_to_mat(st); DPT = c_to_mat(dpt)
        Kw, Vw = K[warp*16:warp*16+16], V[warp*16:warp*16+16]
        assert np.allclose(ST, Kw @ Q.T), "ST"; assert np.allclose(DPT, Vw @ dO.T), "DPT"
        # pretend P^T = ST, dS^T = DPT (values irrelevant for mapping)
        dv = [[[0.0]*4 for _ in range(32)] for _ in range(D // 8)]; dk = [[[0.0]*4 for _ in range(32)] for _ in range(D // 8)]
        for kk in range(kBr // 16):
            ap = [[(st[2*kk][l][0], st[2*kk][l][1]), (st[2*kk][l][2], st[2*kk][l][3]), (st[2*kk+1][l][0], st[2*kk+1][l][1]), (st[2*kk+1][l][2], st[2*kk+1][l][3])] for l in range(32)]
            as_ = [[(dpt[2*kk][l][0], dpt[2*kk][l][1]), (dpt[2*kk][l][2], dpt[2*kk][l][3]), (dpt[2*kk+1][l][0], dpt[2*kk+1][l][1]), (dpt[2*kk+1][l][2], dpt[2*kk+1][l][3])] for l in range(32)]
            for dp in range(D // 16):
                addr = [swz(D, kk*16 + (l % 8) + ((l // 8) & 1)*8, dp*2 + l // 16) for l in range(32)]
                bo = ldm(sdO, addr, 4, True); bq = ldm(sQ, addr, 4, True)
                mma(dv[2*dp], ap, [x[0] for x in bo], [x[1] for x in bo]); mma(dv[2*dp+1], ap, [x[2] for x in bo], [x[3] for x in bo])
                mma(dk[2*dp], as_, [x[0] for x in bq], [x[1] for x in bq]); mma(dk[2*dp+1], as_, [x[2] for x in bq], [x[3] for x in bq])
            for l in range(32):
                g, t4 = l // 4, l % 4
                for r in range(2):
                    kr = warp*16 + g + 8*r
                    o = swz(kBr, kr, 2*kk) + 2*t4; sdS[o:o+2] = as_[l][r]
                    o = swz(kBr, kr, 2*kk+1) + 2*t4; sdS[o:o+2] = as_[l][2+r]
        assert np.allclose(c_to_mat(dv), ST @ dO), "dV"; assert np.allclose(c_to_mat(dk), DPT @ Q), "dK"
        DS_full[warp*16:warp*16+16] = DPT
    # dQ = dS K, dS = DS_full^T (queries x keys)
    dQ = np.zeros((kBr, D))
    for warp in range(4):
        for mt in range(kBr // 16):
            dq = [[[0.0]*4 for _ in range(32)] for _ in range(kDQ)]
            for ks in range(kBc // 16):
                a = ldm(sdS, [swz(kBr, ks*16 + (l % 8) + (l // 16)*8, mt*2 + ((l // 8) & 1)) for l in range(32)], 4, True)
                for n in range(kDQ):
                    bk = ldm(sK, [swz(D, ks*16 + (l % 8) + ((l // 8) & 1)*8, warp*kDQ + n) for l in range(32)], 2, True)
                    mma(dq[n], a, [x[0] for x in bk], [x[1] for x in bk])
            for n in range(kDQ):
                for l in range(32):
                    g, t4 = l // 4, l % 4
                    col = (warp*kDQ + n)*8 + 2*t4
                    for r in range(2):
                        i = mt*16 + g + 8*r
                        dQ[i, col:col+2] += dq[n][l][2*r:2*r+2]
    assert np.allclose(dQ, DS_full.T @ K), "dQ"


@pytest.mark.parametrize("D", [32, 64, 128])
def test_forward_fragments(D):
    check_forward(D)


@pytest.mark.parametrize("D", [32, 64, 128])
def test_backward_fragments(D):
    check_backward(D)
