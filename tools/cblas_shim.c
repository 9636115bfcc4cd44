/* Unprefixed CBLAS/LAPACK names for scipy-openblas32, so that MLX can bind to it.
 *
 * Why: MLX's Linux CPU wheel calls `cblas_sgemm` & co. and, without help, gets the slow
 * reference BLAS it bundles. The PyPI package scipy-openblas32 is a fast OpenBLAS built for
 * every x86_64/aarch64 CPU (DYNAMIC_ARCH, 32-bit integers like MLX), but it names its symbols
 * `scipy_cblas_sgemm`, `scipy_sgesdd_`, ... This library exports the names libmlx.so imports
 * (`nm -D --undefined-only libmlx.so`) as GNU indirect functions (ifunc) whose resolvers
 * return the `scipy_` function: the dynamic linker binds MLX's calls straight to OpenBLAS,
 * with no wrapper frame and no prototype to get wrong (the Fortran LAPACK routines take
 * hidden string-length arguments). trioserve/blas.py loads it with RTLD_GLOBAL before the
 * first `import mlx`.
 *
 * Built by tools/build_blas_shim.sh (run by tools/bootstrap.sh); glibc only.
 */

#define FORWARD(name)                                                        \
    extern void scipy_##name(void);                                          \
    static void (*resolve_##name(void))(void) { return scipy_##name; }       \
    void name(void) __attribute__((ifunc("resolve_" #name)));

/* CBLAS: every MLX matmul. */
FORWARD(cblas_sgemm)
FORWARD(cblas_dgemm)
FORWARD(cblas_cgemm)

/* LAPACK: mx.linalg (inv, svd, eig, eigh, qr, lu, cholesky, tri_inv). */
FORWARD(cgeev_)
FORWARD(cgesdd_)
FORWARD(cheevd_)
FORWARD(dgeev_)
FORWARD(dgeqrf_)
FORWARD(dgesdd_)
FORWARD(dgetrf_)
FORWARD(dgetri_)
FORWARD(dorgqr_)
FORWARD(dpotrf_)
FORWARD(dsyevd_)
FORWARD(dtrtri_)
FORWARD(sgeev_)
FORWARD(sgeqrf_)
FORWARD(sgesdd_)
FORWARD(sgetrf_)
FORWARD(sgetri_)
FORWARD(sorgqr_)
FORWARD(spotrf_)
FORWARD(ssyevd_)
FORWARD(strtri_)
