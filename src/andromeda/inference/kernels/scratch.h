// Per-thread scratch shared by the kernels (decode_sdpa.c, attention_int8.c; the builds' cache keys
// hash every header of this folder, `native.kernel_headers`).
#ifndef ANDROMEDA_SCRATCH_H
#define ANDROMEDA_SCRATCH_H
#include <stddef.h>
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

#endif
