/* The unprefixed CBLAS GEMMs that MLX's CPU backend calls, forwarded to scipy-openblas32.

   scipy-openblas32 (PyPI) is an optimised OpenBLAS that needs no Fortran runtime, but it
   prefixes every symbol with `scipy_`, so MLX cannot bind to it directly. Loaded with
   RTLD_GLOBAL before MLX (mlx_engine/blas.py), these three definitions come first in symbol
   lookup and MLX's matmuls run on OpenBLAS instead of the wheel's reference BLAS. The
   `scipy_*` references resolve against the scipy-openblas32 library loaded just before. */

typedef int blasint;

void scipy_cblas_sgemm(int, int, int, blasint, blasint, blasint, float, const float *,
                       blasint, const float *, blasint, float, float *, blasint);
void scipy_cblas_dgemm(int, int, int, blasint, blasint, blasint, double, const double *,
                       blasint, const double *, blasint, double, double *, blasint);
void scipy_cblas_cgemm(int, int, int, blasint, blasint, blasint, const void *, const void *,
                       blasint, const void *, blasint, const void *, void *, blasint);

void cblas_sgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, float alpha,
                 const float *a, blasint lda, const float *b, blasint ldb, float beta,
                 float *c, blasint ldc) {
  scipy_cblas_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, double alpha,
                 const double *a, blasint lda, const double *b, blasint ldb, double beta,
                 double *c, blasint ldc) {
  scipy_cblas_dgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_cgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, const void *alpha,
                 const void *a, blasint lda, const void *b, blasint ldb, const void *beta,
                 void *c, blasint ldc) {
  scipy_cblas_cgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
