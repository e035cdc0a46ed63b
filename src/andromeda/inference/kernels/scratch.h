// Per-thread scratch shared by the kernels (decode_sdpa.c, attention_int8.c, flash_attention.c,
// layer_norm.c; the builds' cache keys hash every header of this folder, `native.kernel_headers`).
#ifndef ANDROMEDA_SCRATCH_H
#define ANDROMEDA_SCRATCH_H
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

// A 64-byte aligned buffer of at least `bytes` held by the calling thread between calls (OpenMP's
// threads persist; `buffer` and `capacity` are the caller's _Thread_local pair): grown, never
// shrunk, so a decoding step's calls allocate nothing. NULL when out of memory.
static inline void *thread_buffer(void **buffer, size_t *capacity, size_t bytes) {
  if (bytes > *capacity) {
    free(*buffer);
    *capacity = (bytes + 4095) / 4096 * 4096;
    *buffer = aligned_alloc(64, *capacity);
    if (!*buffer) *capacity = 0;
  }
  return *buffer;
}

// Sums over rows split between OpenMP threads, independent of which thread finishes first: each
// thread adds into its own row of `n` floats (`partial_row`, inside the parallel region), and
// `partials_add` adds the rows in thread order. `partials_open` allocates them zeroed for
// omp_get_max_threads() threads (NULL when out of memory).
typedef struct {
  float *rows;
  int threads, team;
  int64_t n;
} Partials;

static inline Partials partials_open(int64_t n) {
  const int threads = omp_get_max_threads();
  return (Partials){(float *)calloc((size_t)threads * (size_t)n, sizeof(float)), threads, 1, n};
}

// In a parallel region: the calling thread's row (and the team's size noted, for partials_add).
static inline float *partial_row(Partials *p) {
#pragma omp single
  p->team = omp_get_num_threads();
  return p->rows + (size_t)omp_get_thread_num() * (size_t)p->n;
}

// out[i] += the rows' sums, in thread order; frees the rows.
static inline void partials_add(Partials *p, float *out) {
  for (int thread = 0; thread < p->team && thread < p->threads; ++thread)
    for (int64_t i = 0; i < p->n; ++i) out[i] += p->rows[(size_t)thread * (size_t)p->n + i];
  free(p->rows);
}

#endif
